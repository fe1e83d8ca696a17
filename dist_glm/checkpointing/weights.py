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
    if any(ds_dir.glob("layer_*_expert_*_model_states.pt")):
        return expert_parallel_weights(ckpt, ds_dir)
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


def expert_parallel_weights(ckpt: Path, ds_dir: Path) -> dict[str, torch.Tensor]:
    """A checkpoint of an expert-parallel run (DeepSpeed AutoEP): the module's weights from
    mp_rank_00_model_states.pt and each routed expert from its own layer_L_expert_E file, put back into
    transformers' names (`to_transformers_names`). These are the weights the model computed with at that
    step (in the training dtype; under bf16 the fp32 master copies, which only resuming needs, differ in
    the last bits). ZeRO-3 keeps no whole module in that file, so its checkpoints are refused here."""
    import re

    module = safe_load.load(ds_dir / "mp_rank_00_model_states.pt")["module"]
    if any(t.numel() == 0 for t in module.values()):
        raise UserError(
            f"checkpoint '{ckpt}' is an expert-parallel ZeRO-3 checkpoint, which dist_glm's tools cannot consolidate; "
            "resume it, or use the run's final model (output_dir), which is saved in the ordinary layout"
        )
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for f in ds_dir.glob("layer_*_expert_*_model_states.pt"):
        for key, tensor in safe_load.load(f).items():
            m = re.fullmatch(r"(.+)\.experts\.(w[123])\.(\d+)", key)
            if m:
                experts.setdefault(m[1], {}).setdefault(m[2], {})[int(m[3])] = tensor
    for prefix, by_weight in experts.items():
        stacked = {w: torch.stack([t for _, t in sorted(by_weight[w].items())]) for w in ("w1", "w2", "w3")}
        module = to_transformers_names(module, prefix, stacked)
    return module


def to_transformers_names(state: dict, prefix: str, experts: dict[str, torch.Tensor]) -> dict:
    """One AutoEP MoE layer (`prefix`, e.g. model.layers.1.mlp) in transformers' names and shapes: its
    routed experts `w1` (gate), `w3` (up), `w2` (down), each (E, out, in), become `experts.gate_up_proj`
    (E, 2I, H: the gate rows, then the up rows) and `experts.down_proj`; `router.gate.weight` and
    `router.e_score_correction_bias` become `gate.weight` and `gate.e_score_correction_bias`."""
    out = {}
    for key, value in state.items():
        if key.startswith(f"{prefix}.experts."):
            continue
        if key.startswith(f"{prefix}.router."):
            key = f"{prefix}.gate." + key.removeprefix(f"{prefix}.router.").removeprefix("gate.")
        out[key] = value
    out[f"{prefix}.experts.gate_up_proj"] = torch.cat([experts["w1"], experts["w3"]], dim=1)
    out[f"{prefix}.experts.down_proj"] = experts["w2"]
    return out
