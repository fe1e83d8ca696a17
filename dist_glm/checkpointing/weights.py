"""A training checkpoint's weights as one state dict, read without a process group (the tools, export,
and continued training from `init_from_checkpoint` read checkpoints this way)."""

from pathlib import Path

import torch

from dist_glm.checkpointing import checkpoints, safe_load
from dist_glm.errors import UserError


def read_checkpoint_weights(ckpt: Path, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The weights of a training checkpoint as one state dict on CPU, under the trained module's names.

    ZeRO 1-3 keep fp32 master weights partitioned over the ranks' optimizer files (zero_pp_rank_*);
    DeepSpeed's zero_to_fp32 stitches them together without a process group. ZeRO-0 keeps the whole
    module in one file (in the training dtype; its bf16 optimizer's bf16_zero_pp_rank_* files are not a
    format zero_to_fp32 reads)."""
    ds_dir = ckpt / checkpoints.TAG
    safe_load.check_dir(ds_dir, f"checkpoint '{ckpt}'")  # zero_to_fp32 loads with weights_only=False
    if any(ds_dir.glob("zero_pp_rank_*_optim_states.pt")):
        import contextlib
        import io

        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # it prints progress bars and a stage banner
            return get_fp32_state_dict_from_zero_checkpoint(
                str(ckpt), tag=checkpoints.TAG, exclude_frozen_parameters=trainable_only
            )
    files = sorted(ds_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise UserError(f"checkpoint '{ckpt}': no DeepSpeed model states under {ds_dir}; is the checkpoint complete?")
    return safe_load.load(files[0])["module"]
