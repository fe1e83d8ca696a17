"""What LoRA adapts, by kind, on dense and Mixture-of-Experts GLMs.

`lora_target` takes module names (q_proj, ...), `all` / `all-linear`, or these kinds:

- attention       the attention projections (for MLA: q_a/q_b/kv_a/kv_b/o); never the DSA indexer of GLM-5,
                  whose top-k selection passes no gradient back to it
- mlp             the dense MLPs (every layer of a dense GLM, the first layers of an MoE GLM)
- shared_experts  the MoE layers' shared expert
- experts         the routed experts: their 3-D weights (E, out, in), through PEFT's target_parameters
- router          the routers (`mlp.gate`): trained in full next to the adapter (modules_to_save), with
                  their e_score_correction_bias; frozen unless named

On a dense GLM `all` is PEFT's own `all-linear`, as it always was. On an MoE GLM `all` means
attention, mlp, shared_experts and experts, resolved here rather than by PEFT: PEFT 0.21 rewrites the
targets of MoE model types it knows from transformers 4 (gate_proj/up_proj/down_proj become the fused
expert parameters), which silently drops LoRA from the dense MLPs and shared experts and puts it on the
router. dist_glm applies and loads its own adapters with that rewrite off (`native_targets`).
"""

import re
from contextlib import contextmanager

KINDS = ("attention", "mlp", "shared_experts", "experts", "router")
ALL_KINDS = ("attention", "mlp", "shared_experts", "experts")  # what `all` means on an MoE model
ALL_LINEAR = ("all-linear", "all")


def is_router(module) -> bool:
    """The GLM MoE routers: a learned (E, hidden) weight plus the bias that balances expert load."""
    return hasattr(module, "e_score_correction_bias") and hasattr(module, "top_k")


def is_moe(model) -> bool:
    return any(is_router(m) for m in model.modules())


def classify(model) -> dict[str, list[str]]:
    """Full names of what each kind adapts: Linear module names, routed-expert parameter names
    (`...mlp.experts.gate_up_proj`) and router module names."""
    import torch

    out = {k: [] for k in KINDS}
    for name, module in model.named_modules():
        parts = name.split(".")
        if is_router(module):
            out["router"].append(name)
        elif isinstance(module, torch.nn.Linear) and "lm_head" not in parts and "indexer" not in parts:
            kind = "shared_experts" if "shared_experts" in parts else "attention" if "self_attn" in parts else "mlp"
            out[kind].append(name)
        elif parts[-1] == "experts":
            # ZeRO-3 partitions parameters while they load (shape [0]); ds_shape keeps the real one.
            three_d = [
                p for p, t in module.named_parameters(recurse=False) if len(getattr(t, "ds_shape", t.shape)) == 3
            ]
            out["experts"] += [f"{name}.{p}" for p in three_d]
    return out


def wanted(lora_target: str, moe: bool) -> tuple[list[str], list[str]]:
    """(kinds, module names) that `lora_target` asks for."""
    tokens = [t.strip() for t in lora_target.split(",") if t.strip()]
    if any(t in ALL_LINEAR for t in tokens):
        kinds = list(ALL_KINDS) if moe else []
        return kinds + [t for t in tokens if t in KINDS and t not in kinds], []
    return [t for t in tokens if t in KINDS], [t for t in tokens if t not in KINDS]


def layer_pattern(names: list[str]) -> str:
    """One regex for PEFT (full match) covering these module names in every layer: the layer index
    becomes \\d+, so the pattern stays short for a 92-layer model."""
    alternatives = sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(n)) for n in names})
    return "^(?:" + "|".join(alternatives) + ")$"


def peft_targets(model, lora_target: str) -> dict | None:
    """LoraConfig arguments (target_modules, target_parameters, modules_to_save) for `lora_target`
    resolved by kind, or None where PEFT's own resolution is right (a dense model without kind names)."""
    moe = is_moe(model)
    kinds, names = wanted(lora_target, moe)
    if not kinds and not moe:
        return None
    found = classify(model)
    modules = [n for k in kinds if k in ("attention", "mlp", "shared_experts") for n in found[k]]
    if names:
        modules += [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in names]
    parameters = sorted({p.split(".", 3)[-1] for p in found["experts"]}) if "experts" in kinds else []
    routers = sorted({r.split(".", 3)[-1] for r in found["router"]}) if "router" in kinds else []
    return {
        "target_modules": layer_pattern(modules) if modules else None,
        "target_parameters": parameters or None,
        "modules_to_save": routers,
    }


def describe(model) -> str:
    """The adapter's trainable parameters by kind, for the start-up log (`model` is the PeftModel)."""
    counts = dict.fromkeys(KINDS + ("other",), 0)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        kind = (
            "router" if "gate" in parts
            else "shared_experts" if "shared_experts" in parts
            else "experts" if "experts" in parts
            else "attention" if "self_attn" in parts
            else "mlp" if "mlp" in parts
            else "other"
        )  # fmt: skip
        counts[kind] += p.ds_numel if hasattr(p, "ds_numel") else p.numel()
    shown = [f"{k} {n:,}" for k, n in counts.items() if n]
    frozen = [k for k in KINDS if not counts[k]]
    return "trainable by kind: " + ", ".join(shown) + (f"; frozen: {', '.join(frozen)}" if frozen else "")


@contextmanager
def native_targets(model):
    """PEFT with its transformers-4 target rewrite off, for an MoE model whose adapter dist_glm resolved
    (or saved) with transformers 5's own names. PEFT 0.21 applies that rewrite in
    `BaseTuner.inject_adapter` through `convert_peft_config_for_transformers`; this is the one place
    that touches it (tested in tests/test_moe.py, which fails if PEFT moves it)."""
    if not is_moe(model):
        yield
        return
    from peft.utils import transformers_weight_conversion as conversion

    original = conversion.convert_peft_config_for_transformers
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original
