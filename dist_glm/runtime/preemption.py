"""Preemption: save a complete checkpoint and exit cleanly when the scheduler says time is up.

SIGTERM (what Slurm, Kubernetes and most schedulers send before killing) and SIGUSR1 (what the slurm/
templates ask Slurm to send a few minutes before the time limit, `--signal=USR1@180`) only set a flag;
the training loop checks it after each optimizer step. The check is a collective, because a signal may
reach the ranks at different steps, or only some of them, and the checkpoint must be written by all
ranks at the same step. The process then exits with PREEMPTED_EXIT and rank 0 leaves the marker file
the slurm/ templates turn into a requeue; the rerun resumes with `resume_from_checkpoint=auto`.
"""

import os
import signal
from pathlib import Path

import torch

from dist_glm.runtime import collectives, environment

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised after the preemption checkpoint is complete on every rank."""


class PreemptionWatch:
    def __init__(self):
        self.received: int | None = None
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)
        # Under launch/supervise.py: this rank takes signals from now on (dist_glm.runtime.supervise forwards them).
        supervisor = os.environ.get("DIST_GLM_SUPERVISOR_DIR")
        if supervisor and Path(supervisor).is_dir():
            pid_file = Path(supervisor) / f"{environment.rank_from_env()}.pid"
            pid_file.with_suffix(".tmp").write_text(str(os.getpid()))
            pid_file.with_suffix(".tmp").rename(pid_file)

    def _on_signal(self, signum, frame) -> None:
        self.received = signum

    def requested(self) -> bool:
        """Collective: true on every rank when any rank has been signalled."""
        flag = [1.0 if self.received is not None else 0.0]
        return bool(collectives.all_reduce_sum(flag)[0] > 0) if torch.distributed.is_initialized() else bool(flag[0])


def mark_for_requeue(checkpoint: Path) -> None:
    """Rank 0 only, after the checkpoint is complete: tell the job script to requeue. Under srun the exit
    code cannot tell it (the first rank to exit makes srun terminate the rest, so the step's code is
    often 143), hence a file named by the script in DIST_GLM_PREEMPTED_FILE (slurm/common.sh)."""
    marker = os.environ.get("DIST_GLM_PREEMPTED_FILE")
    if marker:
        Path(marker).write_text(f"{checkpoint}\n")
