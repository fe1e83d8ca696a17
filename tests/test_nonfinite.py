"""A step whose loss or gradient is not finite never reaches the weights: skipped on every rank, the run
goes on; too many in a row stop it with a one-line message. The NaN is real: one embedding row of a
saved tiny GLM is set to inf, so any sequence containing that token produces a NaN loss."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_glm.checkpointing.trainer_state import TrainerState
from dist_glm.models.loading import load_tokenizer
from dist_glm.training.guard import SPIKE_WARMUP, Diverged, StepGuard
from tests.conftest import REPO, base_args, read_metrics, run_train

BAD_TEXT = "@@@@"  # "@" is in no other row of the dataset below


def poisoned_copy(src, dst, token_ids=None):
    """A copy of the saved model with the embedding rows of `token_ids` (all rows when None) set to inf."""
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    key = next(k for k in weights if k.endswith("embed_tokens.weight"))
    weights[key] = weights[key].clone()
    weights[key][slice(None) if token_ids is None else token_ids] = float("inf")
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def dataset_with_one_bad_row(path, n=40, bad_index=13):
    rows = [json.loads(line) for line in (REPO / "data/advertisegen_demo/train.jsonl").open(encoding="utf-8")][:n]
    rows[bad_index]["content"] = BAD_TEXT + rows[bad_index]["content"]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def bad_token_ids(model_dir, data):
    tok = load_tokenizer(str(model_dir))
    rows = [json.loads(line) for line in data.open(encoding="utf-8")]
    others = set().union(*(tok(r["content"] + r["summary"])["input_ids"] for r in rows if BAD_TEXT not in r["content"]))
    ids = sorted(set(tok(BAD_TEXT)["input_ids"]) - others)
    assert ids, "the bad text shares every token with the other rows"
    return ids


def trained_weights_are_finite(out, poisoned_ids):
    """Finite everywhere but the poisoned embedding rows themselves (no update ever touches those)."""
    for name, t in load_file(out / "model.safetensors").items():
        if name.endswith("embed_tokens.weight"):
            t = t[[i for i in range(t.size(0)) if i not in poisoned_ids]]
        if not torch.isfinite(t).all():
            return False
    return True


def guarded_args(out, data, model, **extra):
    # One epoch of 40 rows in global batches of 4: exactly one step meets the bad row.
    args = dict(train_from_scratch=False, max_steps=10, learning_rate=1e-3, logging_steps=1, save_steps=0)
    args.update(extra)
    return base_args(out, data, model_name_or_path=model, **args)


@pytest.mark.slow
@pytest.mark.parametrize(
    "nprocs,extra",
    [(1, {}), (2, {"deepspeed": "ds_configs/zero2.json", "per_device_train_batch_size": 2})],
    ids=["1rank-plain", "2ranks-zero2"],
)
def test_a_nan_step_is_skipped_on_every_rank_and_training_goes_on(tmp_path, pretrained_tiny, nprocs, extra):
    data = dataset_with_one_bad_row(tmp_path / "train.jsonl")
    bad_ids = bad_token_ids(pretrained_tiny, data)
    model = poisoned_copy(pretrained_tiny, tmp_path / "poisoned", bad_ids)
    out = tmp_path / "out"
    proc = run_train(guarded_args(out, data, model, **extra), nprocs=nprocs)

    skipped = read_metrics(out, "train/skipped_steps")
    assert list(skipped.values()) == [1], skipped  # one step met the bad row, once
    (bad_step,) = skipped
    assert f"step {bad_step} skipped: loss is nan" in proc.stdout + proc.stderr
    losses = read_metrics(out, "train/loss")
    # Every other step was applied and logged; nothing after the skip went NaN (no poisoned moments).
    assert sorted(losses) == [s for s in range(1, 11) if s != bad_step]
    assert all(math.isfinite(v) for v in losses.values())
    assert trained_weights_are_finite(out, bad_ids)
    # The skipped step used up its learning rate: the schedule is that of a run without a skip.
    lrs = read_metrics(out, "train/learning_rate")
    clean = tmp_path / "clean"
    run_train(guarded_args(clean, data, pretrained_tiny, **extra), nprocs=nprocs)
    assert lrs == {s: v for s, v in read_metrics(clean, "train/learning_rate").items() if s != bad_step}


@pytest.mark.slow
def test_every_step_nan_stops_with_the_last_checkpoint_named(tmp_path, pretrained_tiny):
    data = dataset_with_one_bad_row(tmp_path / "train.jsonl")
    model = poisoned_copy(pretrained_tiny, tmp_path / "poisoned")  # every row gives NaN
    out = tmp_path / "out"
    # Step 1 is skipped and checkpointed (its weights are the last good ones); step 2 is the second in a row.
    proc = run_train(guarded_args(out, data, model, max_nonfinite_steps=2, save_steps=1), nprocs=1, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    message = [line for line in proc.stderr.splitlines() if "max_nonfinite_steps=2" in line]
    assert message and "step 2: loss is nan" in message[-1], proc.stderr[-3000:]
    assert str(out / "checkpoint-1") in message[-1]
    assert "Traceback" not in proc.stderr
    assert not (out / "model.safetensors").exists()  # no NaN model exported


def test_guard_names_the_last_checkpoint_and_what_to_change():
    guard = StepGuard(TrainerState(), max_nonfinite_steps=2, loss_spike_factor=0)
    assert guard.record(5, 1.0, 0.5, None, None) is None
    assert "step 6 skipped: loss is nan" in guard.record(6, math.nan, math.nan, "loss is nan", None)
    with pytest.raises(Diverged) as err:
        guard.record(7, math.nan, math.nan, "loss is nan", "/out/checkpoint-4")
    text = str(err.value)
    assert "step 7" in text and "/out/checkpoint-4" in text and "weights of step 5" in text and "learning_rate" in text


def test_an_applied_step_resets_the_count_and_zero_means_no_limit():
    state = TrainerState()
    guard = StepGuard(state, max_nonfinite_steps=2, loss_spike_factor=0)
    guard.record(1, math.nan, 0.0, "loss is nan", None)
    guard.record(2, 1.0, 0.5, None, None)
    guard.record(3, math.nan, 0.0, "loss is nan", None)  # not 2 in a row
    assert (state.skipped_steps, state.skipped_in_a_row) == (2, 1)
    unlimited = StepGuard(TrainerState(), max_nonfinite_steps=0, loss_spike_factor=0)
    for step in range(1, 20):
        unlimited.record(step, math.nan, 0.0, "loss is nan", None)


def test_spike_guard_waits_for_history_then_refuses_outliers():
    guard = StepGuard(TrainerState(), max_nonfinite_steps=3, loss_spike_factor=3.0)
    for step in range(1, SPIKE_WARMUP):
        assert guard.loss_verdict(100.0 if step == 1 else 2.0) is None  # too little history to judge
        guard.record(step, 2.0, 1.0, None, None)
    guard.record(SPIKE_WARMUP, 2.0, 1.0, None, None)
    assert guard.loss_verdict(5.9) is None
    assert "exceeds loss_spike_factor=3 x the running median 2.0000" in guard.loss_verdict(6.1)
    assert guard.loss_verdict(math.inf) == "loss is inf"
