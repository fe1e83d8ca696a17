"""What the loop knows about its own progress: the step and the eval bookkeeping that early stopping
and `best_metric` follow. Saved as-is in every checkpoint's trainer_state.json and restored on resume."""

import dataclasses
import math
from dataclasses import dataclass, field

from dist_glm.config import LOWER_IS_BETTER


@dataclass
class TrainerState:
    global_step: int = 0
    best_eval_loss: float | None = None
    best_metric: float | None = None  # of metric_for_best_model
    best_step: int | None = None
    evals_without_improvement: int = 0
    # The step guard's (dist_glm.training.guard): skipped steps, and the losses its spike median is taken over.
    skipped_steps: int = 0
    skipped_in_a_row: int = 0
    recent_losses: list[float] = field(default_factory=list)
    overflow_steps: int = 0  # fp16 updates the loss scaler skipped

    def record_eval(self, record: dict[str, float], step: int, metric: str, patience: int) -> bool:
        """Fold one eval into the state; returns whether early stopping should stop now. Every rank
        computed the same all-reduced (or gathered) metrics, so every rank returns the same answer."""
        loss = record["eval/loss"]
        self.best_eval_loss = loss if self.best_eval_loss is None else min(self.best_eval_loss, loss)
        value = record[f"eval/{metric}"]
        lower = metric in LOWER_IS_BETTER
        # A tie is not an improvement: patience counts evals that did not beat the best.
        better = self.best_metric is None or (value < self.best_metric if lower else value > self.best_metric)
        if better:
            self.best_metric, self.best_step, self.evals_without_improvement = value, step, 0
        else:
            self.evals_without_improvement += 1
        return bool(patience) and self.evals_without_improvement >= patience

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainerState":
        """From trainer_state.json; extra keys (the checkpoint's layout) are not state. Checkpoints written
        before this class recorded a missing best eval loss as Infinity."""
        names = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in saved.items() if k in names})
        if state.best_eval_loss is not None and not math.isfinite(state.best_eval_loss):
            state.best_eval_loss = None
        return state


# What a checkpoint's trainer_state.json records besides the state: the layout a resume must match.
LAYOUT_KEYS = ("world_size", "global_batch", "total_steps")


def state_file_problem(saved) -> str | None:
    """What makes a parsed trainer_state.json unusable (a wrong type anywhere), or None. A resume reads
    every one of these fields, so a file that fails here counts as damaged, like a truncated one."""
    if not isinstance(saved, dict):
        return "not a JSON object"

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    def is_number(v) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    if not is_int(saved.get("global_step")):
        return f"global_step is {saved.get('global_step')!r}, not a step number"
    for key in LAYOUT_KEYS:
        if key in saved and not is_int(saved[key]):
            return f"{key} is {saved[key]!r}, not a whole number"
    for f in dataclasses.fields(TrainerState):
        if f.name not in saved or f.name == "global_step":
            continue
        v = saved[f.name]
        ok = {
            "recent_losses": isinstance(v, list) and all(is_number(x) for x in v),
            "best_step": v is None or is_int(v),
            "best_eval_loss": v is None or is_number(v),
            "best_metric": v is None or is_number(v),
        }.get(f.name, is_int(v))
        if not ok:
            return f"{f.name} is {v!r}, of the wrong type"
    return None
