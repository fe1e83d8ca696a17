"""MPI launch: `mpirun -np 2 python launch/train.py` (ranks from OpenMPI, the rendezvous address
broadcast through mpi4py) and `deepspeed --launcher openmpi --hostfile` give the single-process losses."""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, base_args, child_env, read_metrics, run_train

MPIRUN = shutil.which("mpirun")
# On a user's machine without MPI these skip; CI installs OpenMPI and mpi4py and must not skip them.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (MPIRUN and importlib.util.find_spec("mpi4py")) and not os.environ.get("DIST_GLM_REQUIRE_CLUSTER_TESTS"),
        reason="needs OpenMPI (mpirun) and mpi4py",
    ),
]
# Root in a container needs these two; oversubscribe because 2 ranks may exceed the cores mpirun counts.
MPI_FLAGS = ["--allow-run-as-root", "--oversubscribe"]
SETTINGS = dict(max_steps=6, deepspeed="ds_configs/zero2.json")


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, varlen_data):
    out = tmp_path_factory.mktemp("mpi") / "one"
    run_train(base_args(out, varlen_data, **SETTINGS), nprocs=None)
    return read_metrics(out, "train/loss")


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_mpirun_two_ranks(tmp_path, varlen_data, single_process):
    out = tmp_path / "mpirun"
    args = base_args(out, varlen_data, per_device_train_batch_size=2, **SETTINGS)
    run([MPIRUN, *MPI_FLAGS, "-np", "2", sys.executable, "launch/train.py", *args])
    losses = read_metrics(out, "train/loss")
    assert sorted(losses) == list(range(1, 7))
    assert max(abs(losses[s] - single_process[s]) for s in losses) < 2e-5


def test_deepspeed_openmpi_launcher_with_hostfile(tmp_path, varlen_data, single_process):
    out, hostfile = tmp_path / "ds_openmpi", tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    deepspeed = str(os.path.join(os.path.dirname(sys.executable), "deepspeed"))
    args = base_args(out, varlen_data, per_device_train_batch_size=2, **SETTINGS)
    # --force_multi: use mpirun even though the hostfile names one host; --no_ssh_check and
    # --master_addr: DeepSpeed would otherwise ssh to the first host to check it and find its address.
    cmd = [deepspeed, "--hostfile", str(hostfile), "--launcher", "openmpi", "--force_multi", "--no_ssh_check"]
    cmd += ["--master_addr", "127.0.0.1", f"--launcher_args={' '.join(MPI_FLAGS)}", "launch/train.py", *args]
    run(cmd)
    losses = read_metrics(out, "train/loss")
    assert sorted(losses) == list(range(1, 7))
    assert max(abs(losses[s] - single_process[s]) for s in losses) < 2e-5
