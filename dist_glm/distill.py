"""Knowledge distillation: a frozen GLM teacher's next-token distributions guide a student.

The objective per trainable token is `alpha * T^2 * KD(student/T, teacher/T) + (1 - alpha) * CE`, and
like cross-entropy it is returned as a *sum* over labelled tokens, so the loop's normalisation by the
global trainable-token count (and every equivalence it guarantees) holds for it unchanged.

Divergences, with s = log-softmax(student / T), t = log-softmax(teacher / T), over the vocabulary:
- forward_kl: KL(teacher || student) = sum e^t (t - s), mode-covering (the classic Hinton KD);
- reverse_kl: KL(student || teacher) = sum e^s (s - t), mode-seeking;
- jsd: generalised Jensen-Shannon with m = log((1 - beta) e^s + beta e^t):
  beta KL(teacher || m) + (1 - beta) KL(student || m) (the GKD paper's, as in TRL); beta=0.5 is plain JSD.

Memory at GLM's 151,552-entry vocabulary: the straightforward computation holds the student's and the
teacher's B x T x V logits (plus a shifted copy and softmaxes of each) at once. Here the teacher's head
is never run on the whole batch: its hidden states are gathered at the labelled positions during its
forward, and both heads run on chunks of those positions inside the student's head call, with the
chunk recomputed in backward (dist_glm.loss). Peak logit memory is two chunks, O(chunk x V), and the
cost of both heads grows with trainable tokens, not with padded positions.

The teacher is frozen, never holds gradients or optimizer state, and under ZeRO-3 is partitioned across
ranks like the student: a second DeepSpeed engine with no optimizer (as TRL does for its reference
models). DeepSpeed's inference engine is the other option, but it shards by tensor parallelism with its
own kernels (which do not cover GLM) and cannot share ZeRO-3's partitioning, so a teacher larger than
one device would not fit. Only the teacher's LM head is kept whole on every rank (one V x H matrix in
the teacher's dtype), because both heads must run side by side, chunk by chunk, inside the student's
backward as well.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dist_glm import distributed
from dist_glm.config import DistillConfig
from dist_glm.data.batching import model_inputs
from dist_glm.data.template import IGNORE_INDEX
from dist_glm.errors import UserError
from dist_glm.loss import CHUNK_ELEMENTS, CrossEntropy, _causal_lm, has_native_head, head_returns, sum_over_labelled

# ---------------------------------------------------------------- the divergences


@dataclass(frozen=True)
class KDSpec:
    kind: str
    temperature: float
    beta: float
    vocab: int  # the real token range compared (a GLM head is padded past the tokenizer)


def kd_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, spec: KDSpec) -> torch.Tensor:
    """T^2 x divergence per row of N x V logits (in fp32 at least), over the first `spec.vocab` entries."""
    t_ = spec.temperature
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # at least fp32 (float64 stays)
    s = F.log_softmax(student_logits[:, : spec.vocab].to(dtype) / t_, dim=-1)
    t = F.log_softmax(teacher_logits[:, : spec.vocab].to(dtype) / t_, dim=-1)
    if spec.kind == "forward_kl":
        d = (t.exp() * (t - s)).sum(-1)
    elif spec.kind == "reverse_kl":
        d = (s.exp() * (s - t)).sum(-1)
    else:
        b = spec.beta
        m = torch.logsumexp(torch.stack([s + math.log(1 - b), t + math.log(b)]), dim=0)
        d = b * (t.exp() * (t - m)).sum(-1) + (1 - b) * (s.exp() * (s - m)).sum(-1)
    return d * (t_ * t_)


def _chunk_sums(head_forward, h, targets, teacher_h, teacher_weight, spec: KDSpec) -> torch.Tensor:
    z = head_forward(h).float()
    with torch.no_grad():  # the teacher is frozen; in backward's recomputation too
        zt = F.linear(teacher_h, teacher_weight).float()
    return torch.stack([F.cross_entropy(z, targets, reduction="sum"), kd_per_token(z, zt, spec).sum()])


def labelled_distill_sums(head_forward, hidden, labels, teacher_h, teacher_weight, spec: KDSpec) -> torch.Tensor:
    """[CE sum, KD sum] over the labelled positions of the student's `hidden` (B x T x H); `teacher_h`
    holds the teacher's hidden states at the same positions (N x H_teacher)."""
    # Two chunks of logits (student's and teacher's) are alive at a time: half the tokens of a CE chunk.
    chunk = max(1, CHUNK_ELEMENTS // (2 * spec.vocab))
    return sum_over_labelled(
        _chunk_sums, head_forward, hidden, labels, chunk, per_token=(teacher_h,), shared=(teacher_weight, spec), shape=2
    )


def plain_distill_sums(student_logits, teacher_logits, labels, spec: KDSpec) -> torch.Tensor:
    """The straightforward computation over full logits: the reference the tests compare against, and the
    path for remote-code models whose heads cannot run on gathered positions."""
    keep = labels[:, 1:] != IGNORE_INDEX
    z, zt, targets = student_logits[:, :-1][keep].float(), teacher_logits[:, :-1][keep].float(), labels[:, 1:][keep]
    return torch.stack([F.cross_entropy(z, targets, reduction="sum"), kd_per_token(z, zt, spec).sum()])


# ---------------------------------------------------------------- the teacher


class Teacher:
    """The frozen teacher (a DeepSpeed engine without optimizer under ZeRO-3, a plain module otherwise)."""

    def __init__(self, module, head_weight: torch.Tensor):
        self.module, self.head_weight = module, head_weight
        self.native = has_native_head(module)

    @torch.no_grad()
    def hidden_at_labels(self, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        """The teacher's final hidden states at the labelled positions (N x H); its head never runs here."""
        keep = labels[:, 1:] != IGNORE_INDEX
        captured = []

        def capture(head_forward, hidden):
            captured.append(hidden[:, :-1][keep])
            return hidden.new_zeros(1, 1, 1)

        with head_returns(self.module, capture):
            self.module(**inputs)
        return captured[0]

    @torch.no_grad()
    def logits(self, inputs: dict) -> torch.Tensor:
        return self.module(**inputs).logits


class Distillation(CrossEntropy):
    """The distillation objective (see the module docstring); parts logged as train/ce_loss, train/kd_loss."""

    parts = ("ce_loss", "kd_loss")

    def __init__(self, teacher: Teacher, cfg: DistillConfig, vocab: int):
        self.teacher, self.alpha = teacher, cfg.distill_alpha
        self.spec = KDSpec(cfg.distill_loss, cfg.distill_temperature, cfg.distill_jsd_beta, vocab)
        # At eval: the student's KL to the teacher itself (forward KL at T=1), whatever is trained on.
        self.eval_spec = KDSpec("forward_kl", 1.0, 0.5, vocab)

    def sums(self, model, inputs: dict, labels: torch.Tensor, spec: KDSpec) -> torch.Tensor:
        if not (self.teacher.native and has_native_head(model)):
            return plain_distill_sums(model(**inputs).logits, self.teacher.logits(inputs), labels, spec)
        teacher_h = self.teacher.hidden_at_labels(inputs, labels)
        weight = self.teacher.head_weight

        def compute(head_forward, hidden):
            return labelled_distill_sums(head_forward, hidden, labels, teacher_h, weight, spec).view(1, 1, 2)

        with head_returns(model, compute):
            stand_in = model(**inputs).logits
        assert stand_in.numel() == 2, f"expected [ce, kd] from the LM head, got shape {tuple(stand_in.shape)}"
        return stand_in.reshape(2)

    def loss_sums(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ce, kd = self.sums(model, model_inputs(batch), batch["labels"], self.spec)
        return self.alpha * kd + (1 - self.alpha) * ce, {"ce_loss": ce, "kd_loss": kd}

    def eval_sums(self, model, batch: dict) -> dict[str, torch.Tensor]:
        ce, kl = self.sums(model, model_inputs(batch), batch["labels"], self.eval_spec)
        return {"loss": ce, "kl_to_teacher": kl}


# ---------------------------------------------------------------- checks and loading


def _fingerprint(tokenizer) -> tuple[int, str]:
    return len(tokenizer), getattr(tokenizer, "chat_template", None) or ""


def check_teacher(cfg, student_tokenizer=None, need_teacher: bool = False) -> list[str]:
    """Before any weight loads: the teacher's paths resolve, and it shares the student's tokenizer and chat
    template (KD compares the two distributions token by token). Training from a cache needs no teacher
    (`need_teacher`: the cache tool does)."""
    from dist_glm.artifacts import resolve_artifact
    from dist_glm.models import load_tokenizer

    d = cfg.distill
    if not d.teacher_model_name_or_path or (d.distill_cache and not need_teacher):
        return []
    try:
        art = resolve_artifact(d.teacher_model_name_or_path, d.teacher_adapter_name_or_path)
        teacher_tok = load_tokenizer(str(art.base), cfg.model.trust_remote_code)
        if student_tokenizer is None:
            student_tokenizer = load_tokenizer(cfg.model.model_name_or_path, cfg.model.trust_remote_code)
    except UserError as e:
        return [f"teacher_model_name_or_path: {p}" for p in e.problems]
    except (OSError, ValueError) as e:
        return [f"teacher_model_name_or_path='{d.teacher_model_name_or_path}': no usable tokenizer ({e})"]
    (tn, tt), (sn, st) = _fingerprint(teacher_tok), _fingerprint(student_tokenizer)
    where = f"teacher_model_name_or_path='{d.teacher_model_name_or_path}'"
    if tn != sn or teacher_tok.get_vocab() != student_tokenizer.get_vocab():
        return [
            f"{where}: its tokenizer has {tn:,} tokens and the student's ({cfg.model.model_name_or_path}) "
            f"{sn:,}{'' if tn != sn else ' with different ids'}; distillation compares the two models token by "
            "token, so the teacher must use the student's tokenizer (pick a teacher of the same GLM family)"
        ]
    if tt != st:
        return [
            f"{where}: its chat template differs from the student's ({len(tt)} vs {len(st)} characters in "
            "tokenizer_config.json); the teacher must have been trained on the prompts the student sees"
        ]
    return []


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
    from dist_glm.artifacts import DTYPES

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


def load_teacher(cfg, ds_config: dict, device) -> Teacher:
    """Collective under ZeRO-3. The teacher as the inference tools load it (dist_glm.artifacts), frozen;
    under ZeRO-3 loaded partitioned and wrapped in an optimizer-less engine."""
    import deepspeed

    from dist_glm import artifacts
    from dist_glm.models import load_model

    d = cfg.distill
    art = artifacts.resolve_artifact(d.teacher_model_name_or_path, d.teacher_adapter_name_or_path)
    dtype = teacher_dtype(cfg)
    zero3 = distributed.zero_stage(ds_config) == 3
    if zero3 and art.checkpoint is None:
        from dist_glm.config import ModelConfig
        from dist_glm.methods import get_method

        method = get_method(art.method)
        quantization = method.inference_quantization(art.adapter) if art.adapter is not None else None
        tds = teacher_ds_config(ds_config, dtype)
        base_cfg = ModelConfig(model_name_or_path=str(art.base), trust_remote_code=cfg.model.trust_remote_code)
        module = load_model(base_cfg, tds, dtype, cfg.train.seed, quantization)  # partitioned
        if art.adapter is not None:
            from peft import PeftModel

            module = PeftModel.from_pretrained(module, art.adapter)
        method.after_load(module)
    else:
        module = artifacts.load_artifact(art, dtype, device)
    module.requires_grad_(False)
    module.eval()
    if zero3:
        engine, *_ = deepspeed.initialize(model=module, config=teacher_ds_config(ds_config, dtype))
        engine.eval()
        weight = _plain_head_weight(engine.module)
        with deepspeed.zero.GatheredParameters([weight]):
            weight = weight.detach().clone()
        module = engine
    else:
        weight = _plain_head_weight(module).detach()
    share = distributed.all_gather_objects(per_rank_gib(module))
    head_gib = weight.numel() * weight.element_size() / 2**30
    distributed.log(
        f"teacher {Path(d.teacher_model_name_or_path)} ({str(dtype).removeprefix('torch.')}, frozen, no optimizer "
        f"state): weights per rank {', '.join(f'{g:.3g}' for g in share)} GiB, plus its LM head whole on each rank "
        f"({head_gib:.3g} GiB)"
    )
    return Teacher(module, weight)
