"""A preemption signal mid-run: every rank saves a complete checkpoint at the same step and exits
cleanly; the rerun with resume_from_checkpoint=auto finishes with exactly the uninterrupted losses."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO, base_args, child_env, launch_cmd, read_metrics, run_train
from dist_glm.runtime.preemption import PREEMPTED_EXIT

STEPS = 30  # long enough that the signal lands well before the end
COMMON = dict(max_steps=STEPS, save_steps=0, lr_scheduler_type="constant_with_warmup", per_device_train_batch_size=2)


def start(args, nprocs, prefix=()):
    # A session of its own, so the signal reaches the launcher and every rank, as Slurm signals a step
    # (under launch/supervise.py, the supervisor alone: it runs the launcher in a session of its own).
    return subprocess.Popen(
        [*prefix, *launch_cmd(nprocs), *args],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for_step(out, step: int, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if any(line.endswith("}") and json.loads(line).get("step", 0) >= step for line in lines):
            return
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    raise AssertionError("training never reached the step")


def rank_processes(output_dir) -> list:
    return [p for p in psutil.process_iter(["cmdline"]) if str(output_dir) in " ".join(p.info["cmdline"] or [])]


@pytest.mark.slow
@pytest.mark.parametrize("nprocs,sig", [(None, signal.SIGUSR1), (2, signal.SIGTERM)], ids=["1proc-usr1", "2ranks-term"])
def test_signal_saves_and_the_rerun_continues_the_curve(tmp_path, varlen_data, nprocs, sig):
    """2 ranks: the deepspeed launcher under launch/supervise.py, signalled as Kubernetes signals PID 1
    (the supervisor only): its exit must come after the ranks' checkpoint, with their code 75."""
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    run_train(base_args(straight, varlen_data, **COMMON), nprocs=nprocs)

    supervise = [] if nprocs is None else [sys.executable, str(REPO / "launch" / "supervise.py")]
    proc = start(base_args(preempted, varlen_data, **COMMON), nprocs, prefix=supervise)
    wait_for_step(preempted, 3, proc)
    os.killpg(proc.pid, sig)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT, output[-3000:]
    assert "preempted at step" in output, output[-3000:]
    assert not rank_processes(preempted) and not list(preempted.glob("*.tmp")), "exited while ranks were writing"
    saved = [p for p in preempted.glob("checkpoint-*") if not p.name.endswith(".tmp")]
    assert len(saved) == 1 and (saved[0] / "trainer_state.json").is_file(), output[-3000:]
    cut = int(saved[0].name.split("-")[1])
    assert 3 <= cut < STEPS

    run_train(base_args(preempted, varlen_data, resume_from_checkpoint="auto", **COMMON), nprocs=nprocs)
    a, b = read_metrics(straight, "train/loss"), read_metrics(preempted, "train/loss")
    assert sorted(b) == list(range(1, STEPS + 1))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-6
