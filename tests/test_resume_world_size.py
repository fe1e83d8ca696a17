"""A checkpoint written by 2 ranks resumes on 1 rank and on 3 (same global batch): DeepSpeed's per-rank
optimizer partitions are converted to a universal checkpoint automatically, and the loss curve
continues exactly where the 2-rank run left off."""

import pytest

from conftest import base_args, read_metrics, run_train


def resume(tmp_path, data, two: str, nprocs, name: str, **settings):
    out = tmp_path / name
    args = base_args(out, data, resume_from_checkpoint=f"{two}/checkpoint-4", **settings)
    proc = run_train(args, nprocs=nprocs)
    assert "loaded through its universal conversion" in proc.stdout, proc.stdout[-3000:]
    return read_metrics(out, "train/loss")


def assert_continues(straight: dict, resumed: dict, tol: float) -> None:
    assert sorted(resumed) == [5, 6, 7, 8]
    assert max(abs(straight[s] - resumed[s]) for s in resumed) < tol, (straight, resumed)


@pytest.mark.slow
def test_zero2_two_ranks_resume_on_one_and_on_three(tmp_path, varlen_data):
    common = dict(max_steps=8, save_steps=4, deepspeed="ds_configs/zero2.json")
    two = tmp_path / "two"
    run_train(base_args(two, varlen_data, per_device_train_batch_size=3, **common), nprocs=2)  # global batch 6
    straight = read_metrics(two, "train/loss")
    one = resume(
        tmp_path, varlen_data, two, None, "one", per_device_train_batch_size=3, gradient_accumulation_steps=2, **common
    )
    assert_continues(straight, one, 1e-5)
    three = resume(tmp_path, varlen_data, two, 3, "three", per_device_train_batch_size=2, **common)
    assert_continues(straight, three, 1e-5)

    # A different global batch would silently change the data order and the schedule: refused.
    bad = run_train(
        base_args(tmp_path / "bad", varlen_data, resume_from_checkpoint=f"{two}/checkpoint-4", **common), check=False
    )
    assert bad.returncode == 2
    assert "global batch of 6 samples (2 ranks) but this run's is 4" in bad.stderr, bad.stderr[-2000:]


@pytest.mark.slow
def test_zero3_lora_two_ranks_resume_on_one(tmp_path, varlen_data):
    # Adapter checkpoints hold only the trainable weights; the frozen base comes from the model again.
    common = dict(
        max_steps=8, save_steps=4, deepspeed="ds_configs/zero3.json", finetuning_type="lora", learning_rate=1e-2
    )
    two = tmp_path / "two"
    run_train(base_args(two, varlen_data, per_device_train_batch_size=2, **common), nprocs=2)
    straight = read_metrics(two, "train/loss")
    one = resume(tmp_path, varlen_data, two, None, "one", per_device_train_batch_size=4, **common)
    assert_continues(straight, one, 1e-5)
