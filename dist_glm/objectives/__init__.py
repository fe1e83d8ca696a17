"""Training objectives: what the loss is. One `Objective` protocol; each objective is one module:
cross-entropy (`cross_entropy`, every method's default), online distillation from a teacher in memory
(`distillation`, the teacher in `teacher`), offline distillation from a teacher cache
(`cached_distillation`), preference losses on pairs (`preference`, stage=dpo) and KTO on labelled answers
(`kto`, stage=kto). The loop and evaluation
only call the protocol's members, and every objective returns *sums* with `count` saying over what
(labelled tokens; pairs or answers for preference), so the loop's normalisation by the global count holds for each
loss added here.
"""

from typing import Protocol

import torch


class Objective(Protocol):
    parts: tuple[str, ...]  # named parts of the loss, logged as train/<part> (none for plain cross-entropy)
    per_token: bool  # the loss is a mean per labelled token (evaluation then reports its perplexity)

    def collate(self, examples, pad_id: int) -> dict[str, torch.Tensor]:
        """The batch this objective needs from tokenized examples (a cache's targets included)."""

    def count(self, batch: dict) -> int:
        """What the loss is normalised by, in this batch: its trainable tokens, or its pairs for preference
        losses. The loop divides the step's summed loss by the global total of it."""

    def check_rows(self, rows: list) -> None:
        """Refuse, before the first step, rows this objective cannot train on (UserError)."""

    def prepare(self, model, batches: list[dict], device) -> None:
        """Collective. Called on every rank with all of its micro-batches of a step (or of an evaluation)
        before any `loss_sums` / `eval_sums` on them: what the loss needs from the whole global batch (KTO's
        reference point). A no-op for losses that need only their own rows."""

    def loss_sums(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the sum trained on, {part: sum}) over the batch's labelled tokens."""

    def eval_sums(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """{metric: sum} over the batch's labelled tokens; evaluation divides by the global count."""


def check_objective(cfg) -> tuple[list[str], object]:
    """Before launch: the teacher (same tokenizer and template as the student) or the cache's manifest.
    Returns (problems, the teacher's resolved artifact or None): the teacher is resolved once, here."""
    from dist_glm.errors import UserError
    from dist_glm.objectives.cached_distillation import read_manifest
    from dist_glm.objectives.teacher import check_teacher

    if cfg.distill.distill_cache:
        try:
            read_manifest(cfg.distill.distill_cache)
        except UserError as e:
            return e.problems, None
        return [], None
    p = cfg.preference
    if p.enabled and p.needs_reference and (p.ref_logps_cache or p.ref_model):
        from dist_glm.models.artifacts import resolve_artifact
        from dist_glm.objectives.reference import read_manifest as read_reference_manifest

        try:
            read_reference_manifest(cfg) if p.ref_logps_cache else resolve_artifact(p.ref_model)
        except UserError as e:
            return [f"ref_model: {x}" if not p.ref_logps_cache else x for x in e.problems], None
    return check_teacher(cfg)


def build_objective(cfg, ds_config: dict, device, tokenizer, student, teacher=None) -> Objective:
    """Collective under ZeRO-3 (the teacher loads partitioned). The run's objective: cross-entropy, or
    distillation from the teacher artifact that `check_objective` resolved, or from the configured cache."""
    from dist_glm.errors import UserError
    from dist_glm.objectives.cross_entropy import CrossEntropy, vocab_size_of
    from dist_glm.runtime import collectives

    if cfg.preference.enabled:
        from dist_glm.objectives.kto import KTO
        from dist_glm.objectives.preference import Preference
        from dist_glm.objectives.reference import load_reference

        kind = KTO if cfg.preference.stage == "kto" else Preference
        return kind(cfg.preference, load_reference(cfg, student, ds_config, device), student)
    if not cfg.distill.enabled:
        return CrossEntropy()
    vocab = len(tokenizer)
    if cfg.distill.distill_cache:
        from dist_glm.objectives.cached_distillation import CachedDistillation

        return CachedDistillation(cfg, vocab)
    from dist_glm.objectives.distillation import Distillation
    from dist_glm.objectives.teacher import load_teacher, per_rank_gib

    loaded = load_teacher(cfg, teacher, ds_config, device)
    heads = {"student": vocab_size_of(student), "teacher": loaded.head_weight.shape[0]}
    small = [f"{k}'s head has {v}" for k, v in heads.items() if v < vocab]
    if small:
        raise UserError(f"teacher_model_name_or_path: the tokenizer has {vocab} tokens but {', '.join(small)} outputs")
    student_share = collectives.all_gather_objects(per_rank_gib(student))
    collectives.log(f"student weights per rank: {', '.join(f'{g:.3g}' for g in student_share)} GiB")
    collectives.log(
        f"distillation: {cfg.distill.distill_loss} at T={cfg.distill.distill_temperature:g}, "
        f"alpha={cfg.distill.distill_alpha:g}, over the {vocab:,} real tokens of the vocabulary"
    )
    return Distillation(loaded, cfg.distill, vocab)
