"""The distillation teacher: checked before launch (same tokenizer and chat template as the student),
loaded frozen through the one artifact loader (partitioned under ZeRO-3, in an optimizer-less engine),
with only its LM head kept whole on every rank."""

from pathlib import Path

import torch

from dist_glm.errors import UserError
from dist_glm.objectives.cross_entropy import _causal_lm
from dist_glm.objectives.distillation import Teacher
from dist_glm.runtime import collectives, deepspeed_config


def _fingerprint(tokenizer) -> tuple[int, str]:
    return len(tokenizer), getattr(tokenizer, "chat_template", None) or ""


def check_teacher(cfg, student_tokenizer=None, need_teacher: bool = False) -> tuple[list[str], object]:
    """Before any weight loads: the teacher's paths resolve, and it shares the student's tokenizer and chat
    template (KD compares the two distributions token by token). Training from a cache needs no teacher
    (`need_teacher`: the cache tool does). Returns (problems, the resolved teacher artifact or None)."""
    from dist_glm.models.artifacts import resolve_artifact
    from dist_glm.models.loading import load_tokenizer

    d = cfg.distill
    if not d.teacher_model_name_or_path or (d.distill_cache and not need_teacher):
        return [], None
    try:
        art = resolve_artifact(d.teacher_model_name_or_path, d.teacher_adapter_name_or_path)
        teacher_tok = load_tokenizer(str(art.base), cfg.model.trust_remote_code)
        if student_tokenizer is None:
            student_tokenizer = load_tokenizer(cfg.model.model_name_or_path, cfg.model.trust_remote_code)
    except UserError as e:
        return [f"teacher_model_name_or_path: {p}" for p in e.problems], None
    except (OSError, ValueError) as e:
        return [f"teacher_model_name_or_path='{d.teacher_model_name_or_path}': no usable tokenizer ({e})"], None
    (tn, tt), (sn, st) = _fingerprint(teacher_tok), _fingerprint(student_tokenizer)
    where = f"teacher_model_name_or_path='{d.teacher_model_name_or_path}'"
    if tn != sn or teacher_tok.get_vocab() != student_tokenizer.get_vocab():
        return [
            f"{where}: its tokenizer has {tn:,} tokens and the student's ({cfg.model.model_name_or_path}) "
            f"{sn:,}{'' if tn != sn else ' with different ids'}; distillation compares the two models token by "
            "token, so the teacher must use the student's tokenizer (pick a teacher of the same GLM family)"
        ], None
    template_problem = _check_trained_template(cfg, art, teacher_tok, student_tokenizer)
    if template_problem:
        return [f"{where}: {template_problem}"], None
    if tt != st:
        return [
            f"{where}: its chat template differs from the student's ({len(tt)} vs {len(st)} characters in "
            "tokenizer_config.json); the teacher must have been trained on the prompts the student sees"
        ], None
    return [], art


def _check_trained_template(cfg, art, teacher_tok, student_tok) -> str | None:
    """A teacher fine-tuned by dist_glm records the chat template it learned (its config.yaml); identical
    tokenizer files do not make two templates the same prompts. None when they agree or cannot be known."""
    from dist_glm.config import load_config
    from dist_glm.data.template import choose_template
    from dist_glm.models.loading import load_config as load_model_config

    recorded = art.train_cfg
    source = art.checkpoint or art.adapter or art.base
    if recorded is None and (source / "config.yaml").is_file():
        try:
            recorded = load_config([str(source / "config.yaml")], default_yaml=None)
        except UserError:
            return None  # not a dist_glm recipe after all
    if recorded is None:
        return None

    def resolved(name: str, tok, path: str) -> str:
        model_type = load_model_config(path, cfg.model.trust_remote_code).model_type
        return choose_template(name, tok, model_type)

    theirs = resolved(recorded.data.template, teacher_tok, str(art.base))
    ours = resolved(cfg.data.template, student_tok, cfg.model.model_name_or_path)
    if theirs == ours:
        return None
    return (
        f"it was fine-tuned with template {theirs} (its config.yaml) and the student trains with {ours}; the teacher "
        "must have been trained on the prompts the student sees (set template to match)"
    )


def per_rank_gib(module) -> float:
    # Under ZeRO-3 a parameter's local share is its ds_tensor; otherwise the whole tensor is here.
    total = 0
    for p in module.parameters():
        local = getattr(p, "ds_tensor", p)
        total += local.numel() * local.element_size()
    return total / 2**30


def _plain_head_weight(teacher) -> torch.Tensor:
    head = _causal_lm(teacher).get_output_embeddings()
    if hasattr(head, "modules_to_save"):  # PEFT modules_to_save: the trained copy is the active one
        active = head.active_adapter
        head = head.modules_to_save[active if isinstance(active, str) else active[0]]
    if type(head) is not torch.nn.Linear or head.bias is not None:
        raise UserError(
            f"teacher_model_name_or_path: its LM head is a {type(head).__name__}, not a plain linear layer (an "
            "adapter on lm_head?); merge the teacher first (launch/export.py --merge) and distil from the merge"
        )
    return head.weight


def teacher_dtype(cfg) -> torch.dtype:
    from dist_glm.models.artifacts import DTYPES

    name = cfg.distill.teacher_dtype
    return DTYPES[name] if name != "auto" else cfg.train.dtype


def teacher_ds_config(ds_config: dict, dtype: torch.dtype) -> dict:
    """The student's DeepSpeed config minus everything about training: the teacher has no optimizer."""
    z = dict(ds_config.get("zero_optimization", {}))
    z.pop("offload_optimizer", None)
    return {
        "train_micro_batch_size_per_gpu": ds_config["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": ds_config["gradient_accumulation_steps"],
        "train_batch_size": ds_config["train_batch_size"],
        "zero_optimization": z,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 10**9,
    }


def load_teacher(cfg, art, ds_config: dict, device) -> Teacher:
    """Collective under ZeRO-3. The teacher artifact `art` (resolved by check_teacher) through the one
    loader every tool uses (dist_glm.models.artifacts), frozen; under ZeRO-3 loaded partitioned and wrapped
    in an optimizer-less engine."""
    import deepspeed

    from dist_glm.models.artifacts import load_artifact

    dtype = teacher_dtype(cfg)
    zero3 = deepspeed_config.zero_stage(ds_config) == 3
    tds = teacher_ds_config(ds_config, dtype) if zero3 else None
    module = load_artifact(art, dtype, device, partition_with=tds, trust_remote_code=cfg.model.trust_remote_code)
    module.requires_grad_(False)
    module.eval()
    if zero3:
        engine, *_ = deepspeed.initialize(model=module, config=tds)
        engine.eval()
        weight = _plain_head_weight(engine.module)
        with deepspeed.zero.GatheredParameters([weight]):
            weight = weight.detach().clone()
        module = engine
    else:
        weight = _plain_head_weight(module).detach()
    share = collectives.all_gather_objects(per_rank_gib(module))
    head_gib = weight.numel() * weight.element_size() / 2**30
    collectives.log(
        f"teacher {Path(cfg.distill.teacher_model_name_or_path)} ({str(dtype).removeprefix('torch.')}, frozen, no "
        f"optimizer state): weights per rank {', '.join(f'{g:.3g}' for g in share)} GiB, plus its LM head whole on "
        f"each rank ({head_gib:.3g} GiB)"
    )
    return Teacher(module, weight)
