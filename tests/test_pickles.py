"""Crafted `.pt` files in a checkpoint never run: every loader that reads a checkpoint (resume, the
tools' weight reader, init_from_checkpoint) refuses a pickle that names anything but data, before
DeepSpeed's own weights_only=False loaders can see it; rng states load with weights_only=True."""

import json
import pickle
import random
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from dist_glm.checkpointing import checkpoints, safe_load
from dist_glm.checkpointing.weights import read_checkpoint_weights
from dist_glm.errors import UserError


class Payload:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def fake_checkpoint(root, name: str, payload_file: str, legacy: bool = False):
    """A checkpoint directory as dist_glm writes it, with one file replaced by a payload; the manifest
    matches it, so only the pickle check can catch it."""
    ckpt = root / name
    (ckpt / checkpoints.TAG).mkdir(parents=True)
    (ckpt / checkpoints.STATE_FILE).write_text(json.dumps({"global_step": 2, "world_size": 1}))
    torch.save({"module": {"w": torch.zeros(2)}}, ckpt / checkpoints.TAG / "mp_rank_00_model_states.pt")
    torch.save(checkpoints._rng_state(), ckpt / "rng_state_0.pt")
    evil = {"module": {"w": torch.zeros(2)}, "x": Payload(root / "pwned")}
    target = ckpt / payload_file
    if legacy:  # a plain pickle, which torch.load(weights_only=False) would also run
        target.write_bytes(pickle.dumps(evil))
    else:
        torch.save(evil, target)
    checkpoints.seal(ckpt)
    return ckpt, target


@pytest.mark.parametrize("legacy", [False, True], ids=["torch-zip", "plain-pickle"])
@pytest.mark.parametrize("payload_file", ["rng_state_0.pt", "deepspeed/mp_rank_00_model_states.pt"])
def test_every_checkpoint_loader_refuses_a_crafted_file_and_nothing_runs(tmp_path, payload_file, legacy):
    ckpt, target = fake_checkpoint(tmp_path, "checkpoint-2", payload_file, legacy)
    loaders = {
        "resume auto": lambda: checkpoints.resolve_resume_path("auto", str(tmp_path)),
        "resume by name": lambda: checkpoints.resolve_resume_path(str(ckpt), str(tmp_path)),
        "serve/chat/export/evaluate": lambda: read_checkpoint_weights(ckpt, trainable_only=False),
    }
    if payload_file.startswith("deepspeed/"):
        for name, load in loaders.items():
            with pytest.raises(UserError, match="not plain tensor data") as err:
                load()
            assert str(target) in str(err.value), name
    else:  # the tools read only the module states; resume reads the rng file
        for name in ("resume auto", "resume by name"):
            with pytest.raises(UserError, match="could run code"):
                loaders[name]()
        with pytest.raises(pickle.UnpicklingError), pytest.warns(UserWarning) if legacy else nullcontext():
            safe_load.load(target)  # and even direct, weights_only=True holds
    assert not (tmp_path / "pwned").exists()


def test_init_from_checkpoint_refuses_a_crafted_file(tmp_path):
    from dist_glm.config import load_config, save_config
    from dist_glm.training.continued import check_init

    ckpt, target = fake_checkpoint(tmp_path, "checkpoint-2", "deepspeed/mp_rank_00_model_states.pt")
    cfg = load_config(["--model_name_or_path=m", "--dataset=d.jsonl", f"--output_dir={tmp_path / 'out'}"], None)
    save_config(cfg, ckpt / "config.yaml")
    cfg.train.init_from_checkpoint = str(ckpt)
    problems = check_init(cfg, world=1)
    assert len(problems) == 1 and str(target) in problems[0] and "its pickle names io.open" in problems[0]
    assert not (tmp_path / "pwned").exists()


def test_rng_state_round_trips_with_weights_only_in_both_formats(tmp_path):
    """The current file (tensors and numbers) and one written before it (numpy arrays inside) both
    restore the exact generators."""
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    new = checkpoints._rng_state()
    legacy = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(new, tmp_path / "new.pt")
    torch.save(legacy, tmp_path / "legacy.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "new.pt")) == []
    expected = (random.random(), float(np.random.rand()), torch.rand(1).item())
    for name in ("new.pt", "legacy.pt"):
        checkpoints._set_rng_state(safe_load.load(tmp_path / name))
        assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expected, name


def test_real_deepspeed_states_pass_the_check(tmp_path):
    """What DeepSpeed's ZeRO optimizer states hold (loss scaler, stage enum) is on the allow-list."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    state = {"loss_scaler": DynamicLossScaler(2**16, 1000, 1, 2, False), "zero_stage": ZeroStageEnum.gradients}
    torch.save(state, tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    safe_load.check_dir(tmp_path, "test")
    loaded = safe_load.load(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert loaded["zero_stage"] == ZeroStageEnum.gradients and loaded["loss_scaler"].cur_scale == 2**16
