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
chunk recomputed in backward (dist_glm.objectives.cross_entropy). Peak logit memory is two chunks, O(chunk x V), and the
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

import torch
import torch.nn.functional as F

from dist_glm.config import DistillConfig
from dist_glm.data.batching import collate, model_inputs
from dist_glm.data.template import IGNORE_INDEX
from dist_glm.objectives.cross_entropy import (
    CHUNK_ELEMENTS,
    count_trainable_tokens,
    has_native_head,
    head_returns,
    sum_over_labelled,
    sums_from_head,
)


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


@dataclass(frozen=True)
class KDMix:
    """What both distillation objectives (online, and from a cache) share, held by each rather than
    inherited: the weight alpha, the divergence trained on and the one evaluated, and how a pair of sums
    [CE, KD] becomes the loss and the parts logged (train/ce_loss, train/kd_loss)."""

    alpha: float
    spec: KDSpec
    eval_spec: KDSpec  # at eval: the student's KL to the teacher itself (forward KL at T=1)

    parts = ("ce_loss", "kd_loss")

    @classmethod
    def from_config(cls, d: DistillConfig, vocab: int) -> "KDMix":
        spec = KDSpec(d.distill_loss, d.distill_temperature, d.distill_jsd_beta, vocab)
        return cls(d.distill_alpha, spec, KDSpec("forward_kl", 1.0, 0.5, vocab))

    def loss_sums(self, sums_at) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`sums_at(spec)` -> [CE sum, KD sum] over a batch's labelled tokens."""
        ce, kd = sums_at(self.spec)
        return self.alpha * kd + (1 - self.alpha) * ce, {"ce_loss": ce, "kd_loss": kd}

    def eval_sums(self, sums_at) -> dict[str, torch.Tensor]:
        ce, kl = sums_at(self.eval_spec)
        return {"loss": ce, "kl_to_teacher": kl}


class Distillation:
    """Online distillation from a teacher in memory (see the module docstring); an `Objective`."""

    parts = KDMix.parts
    per_token = True

    def __init__(self, teacher: Teacher, cfg: DistillConfig, vocab: int):
        self.teacher, self.mix = teacher, KDMix.from_config(cfg, vocab)

    def collate(self, examples, pad_id: int) -> dict[str, torch.Tensor]:
        return collate(examples, pad_id)

    def count(self, batch: dict) -> int:
        return count_trainable_tokens(batch["labels"])

    def check_rows(self, rows: list) -> None:
        """Any row trains: the teacher sees what the student sees."""

    def prepare(self, model, batches: list[dict], device) -> None:
        """A token's loss needs nothing beyond its own row."""

    def sums(self, model, inputs: dict, labels: torch.Tensor, spec: KDSpec) -> torch.Tensor:
        if not (self.teacher.native and has_native_head(model)):
            return plain_distill_sums(model(**inputs).logits, self.teacher.logits(inputs), labels, spec)
        teacher_h = self.teacher.hidden_at_labels(inputs, labels)
        weight = self.teacher.head_weight
        return sums_from_head(
            model, inputs, lambda head, hidden: labelled_distill_sums(head, hidden, labels, teacher_h, weight, spec), 2
        )

    def loss_sums(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.mix.loss_sums(lambda spec: self.sums(model, model_inputs(batch), batch["labels"], spec))

    def eval_sums(self, model, batch: dict) -> dict[str, torch.Tensor]:
        return self.mix.eval_sums(lambda spec: self.sums(model, model_inputs(batch), batch["labels"], spec))
