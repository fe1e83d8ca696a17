"""`.pt` files from somewhere else: a checkpoint copied from shared storage or downloaded can carry a
pickle that runs code when loaded.

Our own loads use `torch.load(weights_only=True)`, which builds only tensors, containers and the
classes allowed here. DeepSpeed's loaders (engine.load_checkpoint, zero_to_fp32, the universal
converter) call `torch.load(weights_only=False)` themselves, so before any of them sees a checkpoint,
`check_dir` reads every `.pt` file's pickle without running it (torch's own scanner) and refuses one
that names anything outside this list. What DeepSpeed 0.19's states need (seen in ZeRO 0-3, offload,
fp16, LoRA and universal checkpoints):

- `deepspeed.runtime.fp16.loss_scaler.LossScaler` / `DynamicLossScaler`: the loss scaler in every
  ZeRO optimizer state (a few numbers: scale, window, hysteresis);
- `deepspeed.runtime.zero.config.ZeroStageEnum`: the stage the partitions were written with;
- `deepspeed.utils.tensor_fragment.fragment_address`: offsets of a parameter in a flat fp16 buffer.

and, for `rng_state_RANK.pt` written before this module existed, numpy's array reconstruction
(`numpy.ndarray`, `numpy.dtype`, `numpy._core.multiarray._reconstruct`). These classes only hold data:
building them sets numbers and arrays, nothing else runs.
"""

import importlib
from pathlib import Path

import torch

from dist_glm.errors import UserError

ALLOWED = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",
)


def foreign(path: Path) -> str | None:
    """What in this file's pickle is outside the allow-list, or None when it holds only data."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (ValueError, RuntimeError, OSError) as e:
        # Not torch's zip format: a legacy or hand-made pickle, which torch.load would run as is.
        return f"it is not a torch.save zip archive ({str(e).splitlines()[0]})"
    extra = sorted(set(names) - set(ALLOWED))
    return f"its pickle names {', '.join(extra)}" if extra else None


def check_dir(root: Path, what: str) -> None:
    """Refuse a checkpoint directory any of whose `.pt` files could run code when loaded."""
    for f in sorted(Path(root).rglob("*.pt")):
        problem = foreign(f)
        if problem is not None:
            raise UserError(
                f"{what}: {f} is not plain tensor data ({problem}); a training checkpoint never holds that and "
                "loading it could run code: refusing it. Use a checkpoint written by dist_glm, or check where this "
                "file came from"
            )


def _allowed_objects() -> list:
    found = []
    for name in ALLOWED:
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            pass  # e.g. numpy 1.x has no numpy._core; the other spelling covers it
    return found


def load(path: Path):
    """torch.load that builds nothing but tensors, containers and the allow-listed classes."""
    with torch.serialization.safe_globals(_allowed_objects()):
        return torch.load(path, map_location="cpu", weights_only=True)
