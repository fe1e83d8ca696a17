"""Exact resume: the loss curve after resuming equals the uninterrupted run's, including after a
SIGKILL mid-run, and an interrupted save never counts as a checkpoint."""

import os
import signal
import subprocess
import time

import pytest

from conftest import REPO, base_args, child_env, launch_cmd, read_metrics, run_train

TOL = 1e-6


def args(out, data, **kw):
    # LoRA with dropout exercises the RNG-state restore as well as optimizer and scheduler state.
    settings = {
        "max_steps": 20,
        "save_steps": 5,
        "lr_scheduler_type": "cosine",
        "finetuning_type": "lora",
        "lora_dropout": 0.1,
        "learning_rate": 1e-2,
    }
    return base_args(out, data, **{**settings, **kw})


@pytest.fixture(scope="module")
def straight(tmp_path_factory, varlen_data):
    out = tmp_path_factory.mktemp("straight")
    run_train(args(out, data=varlen_data), nprocs=2)
    return read_metrics(out, "train/loss")


@pytest.mark.slow
def test_train_10_then_continue_to_20_equals_20_straight(tmp_path_factory, varlen_data):
    # A schedule that does not depend on max_steps, so "10 steps, then continue to 20" is the same
    # run as "20 steps" (a cosine or linear decay would differ in its first 10 steps).
    straight_dir, split_dir = tmp_path_factory.mktemp("straight20"), tmp_path_factory.mktemp("split")
    run_train(args(straight_dir, varlen_data, lr_scheduler_type="constant_with_warmup"), nprocs=2)
    straight = read_metrics(straight_dir, "train/loss")
    run_train(args(split_dir, varlen_data, lr_scheduler_type="constant_with_warmup", max_steps=10), nprocs=2)
    proc = run_train(
        args(
            split_dir,
            varlen_data,
            lr_scheduler_type="constant_with_warmup",
            resume_from_checkpoint=split_dir / "checkpoint-10",
        ),
        nprocs=2,
    )
    resumed = read_metrics(split_dir, "train/loss")
    # A changed total is said out loud (here harmless: this schedule does not depend on it).
    assert "WARNING: this run has 20 steps where the checkpoint's had 10" in proc.stdout
    # LoRA checkpoints leave out the frozen base weights: under ZeRO-0 this file holds the ~70k adapter
    # params and their Adam moments (~0.9 MB), where the frozen 0.9M-parameter model alone is 3.6 MB.
    module_file = split_dir / "checkpoint-10" / "deepspeed" / "mp_rank_00_model_states.pt"
    assert module_file.stat().st_size < 2_000_000
    assert sorted(resumed) == list(range(1, 21))
    for step in range(1, 21):
        assert abs(resumed[step] - straight[step]) < TOL, (step, resumed[step], straight[step])


@pytest.mark.slow
def test_resume_after_sigkill_mid_save_from_last_complete_checkpoint(tmp_path, varlen_data, straight):
    """SIGKILL (launcher and both ranks, no chance to clean up) while the largest file of checkpoint-15
    is half written: auto-resume takes checkpoint-10 and continues the uninterrupted curve. A real save
    of this model takes milliseconds, so tests/fault_injection stalls that one file half way."""
    largest = "checkpoint-15.tmp/deepspeed/mp_rank_00_model_states.pt"
    env = dict(
        child_env(),
        DIST_GLM_TEST_STALL_SAVE=largest,
        PYTHONPATH=os.pathsep.join([str(REPO / "tests" / "fault_injection"), os.environ.get("PYTHONPATH", "")]),
    )
    cmd = launch_cmd(2) + args(tmp_path, varlen_data)
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    stalled, deadline = tmp_path / (largest + ".stalled"), time.time() + 300
    while not stalled.is_file():
        assert proc.poll() is None and time.time() < deadline, "the run ended before saving checkpoint-15"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    half = (tmp_path / largest).stat().st_size
    assert 0 < half < int(stalled.read_text()) and not (tmp_path / "checkpoint-15").exists()

    proc = run_train(args(tmp_path, varlen_data, resume_from_checkpoint="auto"), nprocs=2)
    assert f"resumed from {tmp_path / 'checkpoint-10'} at step 10" in proc.stdout
    resumed = read_metrics(tmp_path, "train/loss")
    assert sorted(resumed) == list(range(1, 21))
    for step in range(1, 21):
        assert abs(resumed[step] - straight[step]) < TOL, (step, resumed[step], straight[step])
    assert (tmp_path / "adapter_model.safetensors").is_file() and (
        tmp_path / "checkpoint-15" / "manifest.json"
    ).is_file()


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_skipped_by_auto_and_refused_by_name(tmp_path, varlen_data):
    """The newest checkpoint's model states cut to half (a truncated copy): auto-resume says so and takes
    the one before it; naming the damaged one is a one-line error naming the file."""
    flags = {"finetuning_type": "full", "save_steps": 2, "lr_scheduler_type": "constant"}
    run_train(base_args(tmp_path, varlen_data, max_steps=4, **flags), nprocs=None)
    states = tmp_path / "checkpoint-4" / "deepspeed" / "mp_rank_00_model_states.pt"
    assert (tmp_path / "checkpoint-4" / "manifest.json").is_file()
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])

    proc = run_train(base_args(tmp_path, varlen_data, max_steps=6, resume_from_checkpoint="auto", **flags), nprocs=None)
    assert "WARNING: skipping damaged checkpoint checkpoint-4" in proc.stdout and str(states) in proc.stdout
    assert f"resumed from {tmp_path / 'checkpoint-2'} at step 2" in proc.stdout
    assert sorted(read_metrics(tmp_path, "train/loss")) == list(range(1, 7))

    states = tmp_path / "checkpoint-6" / "deepspeed" / "mp_rank_00_model_states.pt"
    states.write_bytes(b"")
    named = base_args(tmp_path, varlen_data, max_steps=8, resume_from_checkpoint=tmp_path / "checkpoint-6", **flags)
    proc = run_train(named, nprocs=None, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"resume_from_checkpoint='{tmp_path / 'checkpoint-6'}' is damaged: {states} is 0 bytes" in proc.stderr
