"""Freeze (partial-layer) tuning: only the last (or first) N decoder layers train, optionally only some
modules inside them, plus any extra named modules such as the embeddings or the LM head.

Checkpoints hold only the trained parameters (the frozen ones are reloaded from the base model); the
final artifact is a complete HF model.
"""

import re

from dist_glm.errors import UserError
from dist_glm.methods import full

trainable_only = True  # in checkpoints
export_trainable_only = False  # the export is the whole model
is_adapter = False
can_pack = True
export_refusal = None

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _split(spec: str) -> list[str]:
    return [s.strip() for s in spec.split(",") if s.strip()]


def make_trainable(model, cfg):
    m = cfg.method
    num_layers = model.config.num_hidden_layers
    n = m.freeze_trainable_layers
    if n == 0 or abs(n) > num_layers:
        raise UserError(
            f"freeze_trainable_layers={n}: the model has {num_layers} layers; use 1..{num_layers} "
            f"(the last N) or -1..-{num_layers} (the first N)"
        )
    layers = set(range(num_layers - n, num_layers)) if n > 0 else set(range(-n))
    modules = _split(m.freeze_trainable_modules)
    extra = _split(m.freeze_extra_modules)
    names = [name for name, _ in model.named_parameters()]
    for wanted, key in ((modules, "freeze_trainable_modules"), (extra, "freeze_extra_modules")):
        unknown = [w for w in wanted if w != "all" and not any(f".{w}." in f".{name}" for name in names)]
        if unknown:
            known = sorted({p for name in names for p in name.split(".")[:-1] if not p.isdigit()})
            raise UserError(
                f"{key}: no parameter is named like {unknown}; module names in this model: {', '.join(known)}"
            )
    for name, param in model.named_parameters():
        hit = _LAYER.search(name)
        in_layer = (
            hit is not None
            and int(hit.group(1)) in layers
            and ("all" in modules or any(f".{w}." in name for w in modules))
        )
        param.requires_grad_(in_layer or any(f".{w}." in f".{name}" for w in extra))
    return model


check_config = full.check_config
save_artifact = full.save_artifact
quantization_config = full.quantization_config
owns_adapter = full.owns_adapter
inference_quantization = full.inference_quantization
after_load = full.after_load
published_tensors = full.published_tensors
adapter_settings = full.adapter_settings
continue_adapter = full.continue_adapter
