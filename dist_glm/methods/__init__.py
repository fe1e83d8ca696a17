"""Tuning methods. Each module is one method and exposes the same members (the `Method` protocol), so
neither the training loop nor the tools ever branch on a method's name: adding a method is one new
module here plus its name in config.FinetuningType.

The training loop is identical for every method; only these differ.
"""

import math
from pathlib import Path
from types import ModuleType
from typing import Protocol

from dist_glm.methods import freeze, full, lora, ptuning, qlora


class Method(Protocol):
    # Training
    trainable_only: bool  # checkpoints hold only the trained parameters (frozen ones reload from the base)
    export_trainable_only: bool  # so does the final artifact
    can_pack: bool  # trains rows that pack several samples (raw text packs by default only where this holds)

    def check_config(self, cfg) -> list[str]:
        """Settings this method refuses, each with one that works; checked before anything loads."""

    def quantization_config(self, cfg):
        """How the base weights load for training (bitsandbytes for QLoRA), or None."""

    def make_trainable(self, model, cfg):
        """Mark what trains (and wrap the model, e.g. with PEFT); returns the model."""

    def save_artifact(self, model, state_dict: dict, tokenizer, out_dir) -> None:
        """Write the final, reloadable artifact (rank 0, from the gathered `state_dict`)."""

    # Continued training (dist_glm.training.continued)
    def adapter_settings(self, adapter_dir: Path) -> dict:
        """The MethodConfig values an adapter directory this method wrote fixes (its rank, targets, ...)."""

    def continue_adapter(self, model, adapter_dir: Path, cfg):
        """Like make_trainable, but training goes on with the saved adapter's weights; returns the model."""

    # Loading and export
    is_adapter: bool  # the artifact is applied to a base model rather than standing alone
    export_refusal: str | None  # why export.py cannot make a plain HF model of it, or None

    def owns_adapter(self, adapter_dir: Path, adapter_config: dict) -> bool:
        """Whether this method wrote the adapter directory (its adapter_config.json)."""

    def inference_quantization(self, adapter_dir: Path):
        """How the base must load under this adapter (what it trained against), or None."""

    def after_load(self, model) -> None:
        """Adjust a model loaded for inference."""

    def published_tensors(self, adapter_dir: Path) -> dict | None:
        """For export_layout=original: the tensors this method's adapter is in THUDM's published ChatGLM form,
        written alone (P-tuning v2's prefix encoder); None: the model is merged and written whole."""


METHODS: dict[str, ModuleType] = {"full": full, "freeze": freeze, "lora": lora, "qlora": qlora, "ptuning": ptuning}


def get_method(name: str) -> Method:
    return METHODS[name]  # the name was validated against config.FinetuningType


def adapter_method(adapter_dir: Path, adapter_config: dict) -> str | None:
    """The method that wrote an adapter directory, or None when no method recognises it."""
    return next((name for name, m in METHODS.items() if m.owns_adapter(adapter_dir, adapter_config)), None)


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
