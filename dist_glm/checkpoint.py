"""Training checkpoints: `output_dir/checkpoint-STEP/`.

A checkpoint is written into `checkpoint-STEP.tmp/` and renamed once every rank has finished, so a
crash mid-save can never leave a directory that looks complete: `checkpoint-STEP` exists only whole.
Contents: DeepSpeed's engine state under `deepspeed/` (module, optimizer partitions, lr scheduler),
`rng_state_RANK.pt` per rank, `trainer_state.json` (step, best eval loss, patience) and the resolved
`config.yaml`. The data position needs no saving: the sampler derives it from the step.
"""

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from dist_glm import distributed
from dist_glm.config import save_config
from dist_glm.errors import UserError

TAG = "deepspeed"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return sorted(found)


def resolve_resume_path(spec: str, output_dir: str) -> Path | None:
    """'' -> None; 'auto' -> latest complete checkpoint in output_dir (or None); a path -> that path."""
    if not spec:
        return None
    if spec == "auto":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    p = Path(spec)
    if not (p / STATE_FILE).is_file():
        found = [str(c) for _, c in list_checkpoints(output_dir)]
        choices = f"one of {', '.join(found)}" if found else f"'auto' (output_dir '{output_dir}' has none yet)"
        raise UserError(
            f"resume_from_checkpoint='{spec}': not a complete checkpoint directory (no {STATE_FILE}); use {choices}"
        )
    return p


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, cfg, step: int, trainer_state: dict, trainable_only: bool) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    out = Path(cfg.train.output_dir)
    final, tmp = out / f"checkpoint-{step}", out / f"checkpoint-{step}.tmp"
    rank = torch.distributed.get_rank()
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)  # leftover of a save that crashed earlier
    distributed.barrier()
    # Frozen base weights are not saved for adapter methods: they are reloaded from the base model.
    engine.save_checkpoint(str(tmp), tag=TAG, exclude_frozen_parameters=trainable_only)
    torch.save(_rng_state(), tmp / f"rng_state_{rank}.pt")
    if rank == 0:
        (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "global_step": step}, indent=2))
        save_config(cfg, tmp / "config.yaml")
    # Rename only after every rank's files are on disk; trainer_state.json last marks completeness.
    distributed.barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        prune_checkpoints(out, cfg.train.save_total_limit)
    distributed.barrier()
    return final


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    for _, path in list_checkpoints(str(output_dir))[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(engine, path: Path, trainable_only: bool) -> dict:
    """Restore engine, optimizer, scheduler and this rank's RNG; return the trainer state."""
    load_path, _ = engine.load_checkpoint(
        str(path),
        tag=TAG,
        load_module_strict=not trainable_only,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise UserError(f"resume_from_checkpoint='{path}': DeepSpeed found no engine state under {path / TAG}")
    rank = torch.distributed.get_rank()
    rng_file = path / f"rng_state_{rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / STATE_FILE).read_text())
