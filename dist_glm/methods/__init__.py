"""Tuning methods. Each module exposes the same three functions (the `Method` protocol):

- `make_trainable(model, cfg)`: mark what trains (and wrap the model, e.g. with PEFT); returns the model.
- `save_artifact(model, state_dict, tokenizer, out_dir)`: write the final, reloadable artifact.
- `quantization_config(cfg)`: how the base weights load (bitsandbytes for QLoRA, else None).
- `trainable_only`: whether checkpoints hold only the trained parameters (frozen ones are reloaded
  from the base model on resume); `export_trainable_only`: whether the final artifact does.

The training loop is identical for every method; only these differ.
"""

import math
from types import ModuleType
from typing import Protocol

from dist_glm.methods import freeze, full, lora, ptuning, qlora


class Method(Protocol):
    trainable_only: bool
    export_trainable_only: bool

    def make_trainable(self, model, cfg): ...

    def save_artifact(self, model, state_dict: dict, tokenizer, out_dir) -> None: ...

    def quantization_config(self, cfg): ...


METHODS: dict[str, ModuleType] = {"full": full, "freeze": freeze, "lora": lora, "qlora": qlora, "ptuning": ptuning}


def get_method(name: str) -> Method:
    return METHODS[name]  # the name was validated in config.check_values


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total), counting ZeRO-3 partitioned parameters at their full size and 4-bit
    parameters (packed several to a storage element) at their logical size."""
    trainable = total = 0
    for p in model.parameters():
        quant_state = getattr(p, "quant_state", None)
        if quant_state is not None:
            n = math.prod(quant_state.shape)
        else:
            n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def check_combination(cfg) -> list[str]:
    """Combinations refused before training starts, each with one that works. Everything not refused
    here trains under every ZeRO stage, with or without offload (tests/test_method_matrix.py)."""
    method, out = cfg.method.finetuning_type, []
    if method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            out.append("finetuning_type=qlora needs bitsandbytes; `pip install bitsandbytes`, or use lora")
        if cfg.model.train_from_scratch:
            out.append(
                "finetuning_type=qlora quantizes pretrained weights and train_from_scratch=true has none; "
                "use finetuning_type=lora (or full) for a model trained from scratch"
            )
    if method == "ptuning" and cfg.data.packing:
        out.append(
            "packing=true with finetuning_type=ptuning: packed samples would share one prefix attention "
            "window; set packing=false (or use lora, which packs)"
        )
    return out
