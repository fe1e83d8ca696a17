"""Steps that must not reach the weights: a non-finite loss or gradient (a bad learning rate, a bad row,
a bf16 overflow), and optionally a loss spike. Such a step is skipped on every rank alike: the data is
consumed and the learning-rate schedule moves on, the weights and optimizer moments stay as they were.
After `max_nonfinite_steps` skips in a row the run stops, naming the step and the last good checkpoint,
instead of training on and exporting a NaN model.

Every decision is made from all-reduced numbers (the step's global loss, the global gradient norm), so
every rank decides the same without a collective of its own.
"""

import math
import statistics

from dist_glm.checkpointing.trainer_state import TrainerState

SPIKE_HISTORY = 32  # applied steps the spike guard's running median is taken over
SPIKE_WARMUP = 8  # no spike verdicts before this many applied steps


class Diverged(Exception):
    """Too many steps in a row could not be applied; the message says where and what to change."""


class StepGuard:
    def __init__(self, state: TrainerState, max_nonfinite_steps: int, loss_spike_factor: float):
        self.state, self.max_skips, self.spike_factor = state, max_nonfinite_steps, loss_spike_factor

    def loss_verdict(self, loss: float) -> str | None:
        """Why the step with this global loss must be skipped, or None. Called before the last backward."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        history = self.state.recent_losses
        if self.spike_factor and len(history) >= SPIKE_WARMUP:
            median = statistics.median(history)
            if loss > self.spike_factor * median:
                return (
                    f"loss {loss:.4f} exceeds loss_spike_factor={self.spike_factor:g} x the running median {median:.4f}"
                )
        return None

    def record(self, step: int, loss: float, grad_norm: float, skipped: str | None, last_checkpoint) -> str | None:
        """Fold one step in; returns the log line for a skipped step. Raises Diverged when the run must stop."""
        s = self.state
        if skipped is None:
            s.skipped_in_a_row = 0
            s.recent_losses = (s.recent_losses + [loss])[-SPIKE_HISTORY:]
            return None
        s.skipped_in_a_row += 1
        s.skipped_steps += 1
        if self.max_skips and s.skipped_in_a_row >= self.max_skips:
            where = (
                f"the last complete checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved"
            )
            raise Diverged(
                f"step {step}: {skipped} (grad_norm={grad_norm:.4g}); {s.skipped_in_a_row} steps in a row could not "
                f"be applied (max_nonfinite_steps={self.max_skips}), so training stops with the weights of step "
                f"{step - s.skipped_in_a_row}; {where}. Lower learning_rate (or raise warmup_steps), check the data "
                "rows of these steps, or train in fp32 if bf16 overflows"
            )
        limit = f", stopping at max_nonfinite_steps={self.max_skips}" if self.max_skips else ""
        return (
            f"step {step} skipped: {skipped} (grad_norm={grad_norm:.4g}); weights and optimizer state unchanged "
            f"({s.skipped_in_a_row} in a row{limit})"
        )
