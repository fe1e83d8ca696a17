"""A DeepSpeed build lock left by a killed build never hangs a run silently: an old one is removed at
start-up, a run behind a fresh one says so within seconds and stops with the fix after the timeout."""

import os
import shutil
import subprocess
import sys
import time

import pytest

from dist_glm.runtime.doctor import extensions_dir
from tests.conftest import REPO, base_args, child_env


def extensions_copy(tmp_path):
    """This environment's built ops, copied, so the test's locks block no other run."""
    child_env()  # builds the ops once if needed
    dst = tmp_path / "torch_extensions"
    shutil.copytree(extensions_dir(), dst)
    return dst


def train(tmp_path, ext, timeout_s: int, **env):
    # Optimizer offload needs DeepSpeed's CPU Adam op, so the run must pass its build lock.
    data = REPO / "data/advertisegen_demo/dev.jsonl"
    args = base_args(tmp_path / "out", data, max_steps=1, deepspeed="ds_configs/zero2_offload.json")
    env = dict(child_env(), TORCH_EXTENSIONS_DIR=str(ext), DIST_GLM_BUILD_LOCK_TIMEOUT=str(timeout_s), **env)
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), *args], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.slow
def test_an_old_lock_is_removed_and_the_run_goes_on(tmp_path):
    ext = extensions_copy(tmp_path)
    lock = ext / "cpu_adam" / "lock"
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    proc = train(tmp_path, ext, timeout_s=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"removed a stale DeepSpeed build lock {lock}" in proc.stderr and not lock.exists()


@pytest.mark.slow
def test_a_run_behind_a_lock_says_so_and_stops_with_the_fix_at_the_timeout(tmp_path):
    ext = extensions_copy(tmp_path)
    lock = ext / "cpu_adam" / "lock"
    lock.touch()  # fresh: as if another process were compiling right now
    start = time.monotonic()
    proc = train(tmp_path, ext, timeout_s=20)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "waiting for another process" in proc.stderr and str(lock) in proc.stderr
    assert "was killed; delete the lock" in proc.stderr and time.monotonic() - start < 120
