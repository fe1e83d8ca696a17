"""Continued (incremental) training: taking an earlier result further, on new data or settings.

What an earlier result is, and how a run starts from it (each with a fresh optimizer and schedule unless
stated; `resume_from_checkpoint` is different: it continues the *same* run exactly):
- a full or freeze result is an HF model: `model_name_or_path=out/run1` (nothing here);
- an adapter result: `adapter_name_or_path=out/lora1` continues training that adapter on its base (rank,
  targets, prefix length taken from its adapter_config.json; a conflicting flag is an error); QLoRA
  continues on the base re-quantized as it trained, P-tuning from the saved prefix;
- `merge_adapter=true`: the adapter is merged into its base once (written to output_dir/merged_base, so
  the new artifact's base exists on disk for the tools) and `finetuning_type` trains anew on the merge;
- `init_from_checkpoint=out/run1/checkpoint-600`: that checkpoint's weights, written into the freshly
  built model before DeepSpeed takes it (any ZeRO stage or world size on either side); with
  `init_optimizer_state` also its optimizer moments (then the same world size and ZeRO stage).
"""

import json
from pathlib import Path

from dist_glm.checkpointing import checkpoints, safe_load
from dist_glm.config import Config, MethodConfig, load_config
from dist_glm.errors import UserError
from dist_glm.methods import adapter_method, get_method
from dist_glm.runtime import collectives, deepspeed_config, environment

ADAPTER_FILE = "adapter_config.json"
MERGED_BASE = "merged_base"
MERGED_FROM = "merged_from.json"  # which base and adapter the merge in merged_base/ came from


# ---------------------------------------------------------------- adapters


def _same(key: str, current, saved) -> bool:
    if key in ("lora_target", "lora_modules_to_save"):
        return sorted(filter(None, map(str.strip, str(current).split(",")))) == sorted(
            filter(None, map(str.strip, str(saved).split(",")))
        )
    return current == saved


def adopt_adapter(cfg: Config) -> list[str]:
    """Before launch, identically on every rank: the adapter to continue is one `finetuning_type` trains,
    and its settings become the run's (a setting left at its default takes the adapter's value; one set
    to something else is a conflict)."""
    m = cfg.model
    if not m.adapter_name_or_path:
        return []
    adapter = Path(m.adapter_name_or_path)
    where = f"adapter_name_or_path='{adapter}'"
    if not (adapter / ADAPTER_FILE).is_file():
        return [f"{where}: no {ADAPTER_FILE} there; pass the output_dir of a lora, qlora or ptuning run"]
    kind = adapter_method(adapter, json.loads((adapter / ADAPTER_FILE).read_text(encoding="utf-8")))
    if kind is None:
        return [f"{where}: an adapter no dist_glm method wrote; continue a lora, qlora or ptuning result"]
    method = get_method(kind)
    if m.merge_adapter:
        return [f"merge_adapter=true: {method.export_refusal}"] if method.export_refusal else []
    if kind != cfg.method.finetuning_type and cfg.method.finetuning_type == MethodConfig().finetuning_type:
        # Left at its default: the adapter says which method continues it, as it says its rank and targets.
        if environment.rank_from_env() == 0:
            print(f"[dist_glm] note: {where} is a {kind} adapter: continuing it with finetuning_type={kind}")
        cfg.method.finetuning_type = kind
    if kind != cfg.method.finetuning_type:
        return [
            f"{where} is a {kind} adapter; set finetuning_type={kind} to continue it, or merge_adapter=true to "
            f"train {cfg.method.finetuning_type} on the merge"
        ]
    problems, defaults = [], MethodConfig()
    for key, saved in method.adapter_settings(adapter).items():
        current = getattr(cfg.method, key)
        if _same(key, current, saved):
            continue
        if not _same(key, current, getattr(defaults, key)):
            problems.append(
                f"{key}={current} conflicts with the adapter's {saved} ({adapter / ADAPTER_FILE}); drop {key} to "
                "continue that adapter, or set merge_adapter=true to train a new one on the merge"
            )
        else:
            setattr(cfg.method, key, saved)
    return problems


def prepare_merged_base(cfg: Config) -> None:
    """Collective. With merge_adapter: rank 0 writes base + adapter merged into output_dir/merged_base
    (once; reused on resume unless the base or adapter changed), and the run trains from there as if it
    had been given that model (its config.yaml says so, so checkpoints and tools find the base)."""
    from dist_glm.models.artifacts import resolve_artifact, write_merged

    m = cfg.model
    if not m.merge_adapter:
        return
    out = Path(cfg.train.output_dir) / MERGED_BASE
    source = {"model_name_or_path": m.model_name_or_path, "adapter_name_or_path": m.adapter_name_or_path}
    if collectives.is_main_process():
        recorded = out / MERGED_FROM
        if not (recorded.is_file() and json.loads(recorded.read_text()) == source):
            art = resolve_artifact(m.model_name_or_path, m.adapter_name_or_path)
            dtype = write_merged(art, "auto", out, m.trust_remote_code)
            recorded.write_text(json.dumps(source, indent=2))
            collectives.log(f"merged {m.adapter_name_or_path} into {m.model_name_or_path}: {out} ({dtype})")
    collectives.barrier()
    m.model_name_or_path, m.adapter_name_or_path, m.merge_adapter = str(out), "", False


def prepare_trainable(model, method, cfg: Config):
    """make_trainable, or (adapter_name_or_path) the saved adapter continued."""
    adapter = cfg.model.adapter_name_or_path
    if not adapter:
        return method.make_trainable(model, cfg)
    collectives.log(f"continuing the {cfg.method.finetuning_type} adapter {adapter}")
    return method.continue_adapter(model, Path(adapter), cfg)


# ---------------------------------------------------------------- init_from_checkpoint


def check_init(cfg: Config, world: int) -> list[str]:
    """Before launch: init_from_checkpoint names a complete checkpoint of the same method (and, for its
    optimizer moments, of the same world size and ZeRO stage)."""
    t = cfg.train
    if not t.init_from_checkpoint:
        return []
    path = Path(t.init_from_checkpoint)
    where = f"init_from_checkpoint='{path}'"
    if not (path / checkpoints.STATE_FILE).is_file() or not (path / "config.yaml").is_file():
        return [f"{where}: not a complete checkpoint directory; pass output_dir/checkpoint-STEP of an earlier run"]
    if problem := checkpoints.damage(path):
        return [f"{where} is damaged: {problem}; pass another checkpoint"]
    try:
        safe_load.check_dir(path, where)
    except UserError as e:
        return e.problems
    saved = load_config([str(path / "config.yaml")], default_yaml=None)
    if saved.method.finetuning_type != cfg.method.finetuning_type:
        return [
            f"{where} holds {saved.method.finetuning_type} weights; set finetuning_type="
            f"{saved.method.finetuning_type} (or start from an export of it with model_name_or_path)"
        ]
    if t.init_optimizer_state:
        saved_world = json.loads((path / checkpoints.STATE_FILE).read_text()).get("world_size", world)
        stages = [deepspeed_config.zero_stage(deepspeed_config.read_ds_config(c.train.deepspeed)) for c in (saved, cfg)]
        if saved_world != world or stages[0] != stages[1]:
            return [
                f"init_optimizer_state=true: {where} was written by {saved_world} ranks at ZeRO-{stages[0]}, this "
                f"run is {world} ranks at ZeRO-{stages[1]}; match them, or drop init_optimizer_state (weights only)"
            ]
    return []


def load_init_weights(model, cfg: Config, method, resumed: bool) -> None:
    """Collective, before deepspeed.initialize (the optimizer's fp32 master copies are made from the
    module then). The checkpoint's weights, consolidated from any ZeRO stage by rank 0 alone."""
    from dist_glm.checkpointing.weights import read_checkpoint_weights

    spec = cfg.train.init_from_checkpoint
    if not spec:
        return
    if resumed:  # this run's own checkpoint wins (e.g. after preemption, rerun with resume auto)
        collectives.log(f"init_from_checkpoint={spec} ignored: resuming this run's own checkpoint")
        return
    trainable_only = method.trainable_only
    state = read_checkpoint_weights(Path(spec), trainable_only) if collectives.is_main_process() else None
    try:
        collectives.load_from_rank0(model, state)
    except UserError as e:
        raise UserError(f"init_from_checkpoint='{spec}': {e.problems[0]}") from None
    collectives.log(f"weights from {spec}; new optimizer schedule from step 1")


def load_init_optimizer(engine, cfg: Config, method, resumed: bool) -> None:
    """Collective. With init_optimizer_state: the checkpoint's optimizer moments, under this run's own
    hyperparameters (learning rate from the new schedule, betas, weight decay)."""
    t = cfg.train
    if not (t.init_from_checkpoint and t.init_optimizer_state) or resumed:
        return
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    trainable_only = method.trainable_only
    engine.load_checkpoint(
        t.init_from_checkpoint,
        tag=checkpoints.TAG,
        load_module_strict=not trainable_only,
        load_optimizer_states=True,
        load_lr_scheduler_states=False,
    )
    for group, settings in zip(engine.optimizer.param_groups, fresh, strict=True):
        group.update(settings)
    collectives.log(f"optimizer moments from {t.init_from_checkpoint}")
