"""CPU-side start-up: one process builds and loads no shared-memory all-reduce op, and each rank's
thread count shares the host's cores among the ranks on it, and each rank finds its GPU."""

import subprocess
import sys

import pytest
import torch

from dist_glm.errors import UserError
from dist_glm.runtime import environment
from tests.conftest import REPO, base_args, child_env


@pytest.mark.slow
def test_one_process_builds_no_shared_memory_op(tmp_path):
    empty = tmp_path / "torch_extensions"  # nothing built: whatever the run needs, it would compile here
    empty.mkdir()
    args = base_args(tmp_path / "out", REPO / "data/advertisegen_demo/dev.jsonl", max_steps=1)
    env = dict(child_env(), TORCH_EXTENSIONS_DIR=str(empty))
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), *args], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not any(empty.iterdir()), list(empty.iterdir())  # no op was built for a world of one
    assert "built successfully" not in proc.stdout + proc.stderr


def test_threads_share_the_cores_among_the_ranks_on_a_host(monkeypatch):
    before = torch.get_num_threads()
    cores = len(__import__("os").sched_getaffinity(0))
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert environment.set_cpu_threads(world=8) == max(1, cores // 2) == torch.get_num_threads()
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        assert environment.set_cpu_threads(world=1) == cores  # alone on the host: every core
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert environment.set_cpu_threads(world=1) == 1  # the user's choice stands
    finally:
        torch.set_num_threads(before)


def test_each_rank_finds_its_gpu_whether_it_sees_all_of_them_or_one():
    """srun's default (every task sees the node's 8 GPUs) vs --gpus-per-task=1 (each sees one, as cuda:0);
    anything else is a one-line error saying what to change (no 'invalid device ordinal' later)."""
    from dist_glm.runtime.environment import cuda_device_for

    assert [cuda_device_for(r, visible=8) for r in range(8)] == list(range(8))
    assert [cuda_device_for(r, visible=1) for r in range(8)] == [0] * 8
    with pytest.raises(UserError, match="local rank 5 but this process sees 2 GPUs.*--gpus-per-task=1"):
        cuda_device_for(5, visible=2, rank=13)
