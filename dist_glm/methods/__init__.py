"""Tuning methods. Each module exposes the same three functions (the `Method` protocol):

- `prepare(model, cfg)`: mark what trains (and wrap the model, e.g. with PEFT); returns the model.
- `save_artifact(model, state_dict, tokenizer, out_dir)`: write the final, reloadable artifact.
- `trainable_only`: whether checkpoints hold only the trained parameters (frozen ones are reloaded
  from the base model on resume); `export_trainable_only`: whether the final artifact does.

The training loop is identical for every method; only these differ.
"""

from types import ModuleType
from typing import Protocol

from dist_glm.methods import freeze, full, lora


class Method(Protocol):
    trainable_only: bool
    export_trainable_only: bool

    def prepare(self, model, cfg): ...

    def save_artifact(self, model, state_dict: dict, tokenizer, out_dir) -> None: ...


METHODS: dict[str, ModuleType] = {"full": full, "freeze": freeze, "lora": lora}


def get_method(name: str) -> Method:
    return METHODS[name]  # the name was validated in config.check_values


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total), counting ZeRO-3 partitioned parameters at their full size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
