"""A checkpoint save that hits a full disk (a real tmpfs, 2 ranks under ZeRO-2, each writing its own
optimizer partition): every rank stops together with one clear message (no rank left in a
collective), the partial checkpoint is removed, the older one stays intact and resumable. The same for
output_dir turning read-only mid-run, which rank 0's logs meet first."""

import os
import shutil
import subprocess

import pytest
import torch

from conftest import REPO, base_args, child_env, launch_cmd, run_train
from dist_glm.checkpointing import checkpoints

FLAGS = dict(save_steps=2, lr_scheduler_type="constant", deepspeed="ds_configs/zero2.json", save_total_limit=0)


def mount_tmpfs(path, size: int) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


def resize(path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0 or not shutil.which("mount"):
        if not os.environ.get("DIST_GLM_REQUIRE_CLUSTER_TESTS"):
            pytest.skip("mounting a tmpfs needs root; CI runs this")
    disk = tmp_path / "disk"
    disk.mkdir()
    mount_tmpfs(disk, 256 * 1024**2)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_a_full_disk_fails_the_save_on_every_rank_and_keeps_the_older_checkpoint(small_disk, varlen_data):
    out = small_disk / "run"
    run_train(base_args(out, varlen_data, max_steps=2, **FLAGS), nprocs=2)
    ckpt = out / "checkpoint-2"
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    used = shutil.disk_usage(small_disk).used
    resize(small_disk, used + size // 2)  # room for half of the next checkpoint

    more = base_args(out, varlen_data, max_steps=6, resume_from_checkpoint="auto", **FLAGS)
    proc = run_train(more, nprocs=2, timeout=300, check=False)  # a rank left waiting would time out here
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "saving checkpoint-4 failed" in ln]
    assert lines and all(ln.startswith("train.py: error: rank ") for ln in lines), proc.stderr[-3000:]
    assert any("No space left on device" in ln or "could not be written" in ln for ln in lines), lines
    assert all(float(ln.split(" MiB free")[0].split()[-1]) > size / 1024**2 / 4 for ln in lines), lines
    assert f"a checkpoint of this run takes {size / 1024**2:.1f} MiB (checkpoint-2)" in lines[0], lines
    assert "checkpoint-2 intact" in lines[0] and "--resume_from_checkpoint=auto" in lines[0], lines
    assert not list(out.glob("checkpoint-4*")), "the partial checkpoint was left behind"
    assert checkpoints.damage(ckpt) is None

    resize(small_disk, 256 * 1024**2)  # space freed: the rerun continues from the intact checkpoint
    proc = run_train(more, nprocs=2)
    assert f"resumed from {ckpt} at step 2" in proc.stdout
    assert (out / "checkpoint-6" / checkpoints.MANIFEST_FILE).is_file()


def test_a_failed_torch_save_gives_its_space_back(small_disk):
    # torch.save on a full disk raises twice (the write, then closing the zip); the first failure holds
    # the open file. The error stays referenced (as save_checkpoint holds it) while the space is measured.
    resize(small_disk, 1024**2)
    try:
        torch.save({"x": torch.zeros(400_000)}, small_disk / "a.pt")  # 1.6 MB
    except RuntimeError as e:
        error = e
    assert checkpoints._write_error(error) and error.__context__ is not None
    checkpoints.release_files(error)
    (small_disk / "a.pt").unlink()
    assert shutil.disk_usage(small_disk).free == 1024**2


@pytest.mark.slow
def test_output_dir_turning_read_only_mid_run_stops_every_rank_together(tmp_path, varlen_data):
    # The kernel refuses to remount a filesystem read-only while files are open for writing, so the
    # processes are real and the read-only filesystem is the test shim's (tests/fault_injection): once
    # checkpoint-2 exists, every open for writing under output_dir fails with EROFS.
    out = tmp_path / "run"
    env = dict(
        child_env(),
        PYTHONPATH=os.pathsep.join([str(REPO / "tests" / "fault_injection"), os.environ.get("PYTHONPATH", "")]),
        DIST_GLM_TEST_READ_ONLY=f"{out}:checkpoint-2",
    )
    cmd = launch_cmd(2) + base_args(out, varlen_data, max_steps=8, **FLAGS)
    # A rank left waiting in a collective would hang until the timeout here.
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # One message per rank (the launcher may run the two ranks' stderr together on one line).
    messages = proc.stderr.split("train.py: error: ")[1:]
    assert sorted(m.split(":")[0] for m in messages) == ["rank 0", "rank 1"], proc.stderr[-3000:]
    for m in messages:
        assert "stopped taking writes" in m and "(metrics.jsonl: Read-only file system)" in m, m
        assert "checkpoint-2 intact" in m and "--resume_from_checkpoint=auto" in m, m
    assert checkpoints.damage(out / "checkpoint-2") is None

    proc = run_train(base_args(out, varlen_data, max_steps=8, resume_from_checkpoint="auto", **FLAGS), nprocs=2)
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in proc.stdout
