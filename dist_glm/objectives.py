"""Which objective a run trains with: cross-entropy (dist_glm.loss), online distillation from a teacher
in memory (dist_glm.distill) or offline distillation from a teacher cache (dist_glm.teacher_cache).
The loop and evaluation only call the objective's members (`collate`, `check_rows`, `loss_sums`,
`eval_sums`, `parts`)."""

from dist_glm import distributed
from dist_glm.distill import Distillation, check_teacher, load_teacher, per_rank_gib
from dist_glm.errors import UserError
from dist_glm.loss import CrossEntropy, vocab_size_of
from dist_glm.teacher_cache import CachedDistillation, read_manifest


def check_objective(cfg) -> list[str]:
    """Before launch: the teacher (same tokenizer and template as the student), or the cache's manifest."""
    if cfg.distill.distill_cache:
        try:
            read_manifest(cfg.distill.distill_cache)
        except UserError as e:
            return e.problems
        return []
    return check_teacher(cfg)


def build_objective(cfg, ds_config: dict, device, tokenizer, student):
    """The run's objective: cross-entropy, or distillation from the configured teacher."""
    if not cfg.distill.enabled:
        return CrossEntropy()
    vocab = len(tokenizer)
    if cfg.distill.distill_cache:
        return CachedDistillation(cfg, vocab)
    teacher = load_teacher(cfg, ds_config, device)
    heads = {"student": vocab_size_of(student), "teacher": teacher.head_weight.shape[0]}
    small = [f"{k}'s head has {v}" for k, v in heads.items() if v < vocab]
    if small:
        raise UserError(f"teacher_model_name_or_path: the tokenizer has {vocab} tokens but {', '.join(small)} outputs")
    student_share = distributed.all_gather_objects(per_rank_gib(student))
    distributed.log(f"student weights per rank: {', '.join(f'{g:.3g}' for g in student_share)} GiB")
    distributed.log(
        f"distillation: {cfg.distill.distill_loss} at T={cfg.distill.distill_temperature:g}, "
        f"alpha={cfg.distill.distill_alpha:g}, over the {vocab:,} real tokens of the vocabulary"
    )
    return Distillation(teacher, cfg.distill, vocab)
