"""Mixture-of-Experts GLMs: GLM-4.5/4.6/4.7 (`glm4_moe`), GLM-4.7-Flash (`glm4_moe_lite`) and GLM-5.x
(`glm_moe_dsa`), loaded natively by transformers 5. Everything MoE-specific that training needs is here:
how the experts compute, what ZeRO-3 must know about them, and the routing the metrics report. For a
dense GLM every function here is a no-op, so the loop calls them unconditionally.
"""

import json
import re
from pathlib import Path

import torch

from dist_glm.methods.lora_targets import describe, is_router

MOE_MODEL_TYPES = ("glm4_moe", "glm4_moe_lite", "glm_moe_dsa")
REFUSED_MODEL_TYPES = {
    "glm5_next": (
        "GLM-5.3-Flash (glm5_next) is a multimodal model (Glm5NextForConditionalGeneration) with hyper-connections "
        "and linear attention; dist_glm trains its causal-LM GLMs only, so use GLM-5/5.1/5.2 (glm_moe_dsa), "
        "GLM-4.7-Flash (glm4_moe_lite) or GLM-4.5/4.6/4.7 (glm4_moe)"
    ),
}


def config_of(path: str) -> dict:
    """A checkpoint's config.json, or {} (a missing or unreadable one is reported where the model loads)."""
    f = Path(path) / "config.json"
    try:
        return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
    except (OSError, ValueError):
        return {}


def model_type_of(path: str) -> str | None:
    return config_of(path).get("model_type")


def check_model(model_cfg) -> list[str]:
    """Before anything loads: model types dist_glm refuses, with the reason."""
    model_type = model_type_of(model_cfg.model_name_or_path)
    if model_type in REFUSED_MODEL_TYPES:
        return [f"model_name_or_path='{model_cfg.model_name_or_path}': {REFUSED_MODEL_TYPES[model_type]}"]
    return []


def check_expert_parallel(model_cfg, ep_size: int, method) -> list[str]:
    """Before anything loads: expert parallelism needs an MoE GLM whose expert count it divides, and a
    method that trains the model's own weights (AutoEP replaces the MoE blocks that an adapter attaches to)."""
    if ep_size <= 1:
        return []
    config = config_of(model_cfg.model_name_or_path)
    if not config:
        return []  # reported where the model loads
    where = f"expert_parallel_size={ep_size}"
    if config.get("model_type") not in MOE_MODEL_TYPES:
        return [f"{where}: model_type {config.get('model_type')} has no routed experts; remove expert_parallel_size"]
    if config.get("n_routed_experts", 0) % ep_size:
        return [f"{where} must divide the model's {config.get('n_routed_experts')} routed experts"]
    if method.is_adapter:
        return [
            f"{where} trains full or freeze: DeepSpeed AutoEP replaces the MoE blocks that adapters attach to; "
            "for LoRA on an MoE GLM use ZeRO-3 (--deepspeed=ds_configs/zero3.json) without expert_parallel_size"
        ]
    return []


def check_router_bias_update(model_cfg, rate: float, method) -> list[str]:
    """router_bias_update_rate needs routers with a correction bias, and an artifact that keeps it."""
    if rate <= 0:
        return []
    model_type = model_type_of(model_cfg.model_name_or_path)
    if model_type not in MOE_MODEL_TYPES:
        return [f"router_bias_update_rate: model_type {model_type} has no router bias; remove it"]
    if method.is_adapter:
        return [
            "router_bias_update_rate changes the routers' e_score_correction_bias, which an adapter does not "
            "save; use finetuning_type=full or freeze, or drop router_bias_update_rate"
        ]
    return []


def configure(config, model_cfg) -> None:
    """How the routed experts compute, set on the config before the model is built. grouped_mm (one
    grouped matmul over all experts) is transformers' default and runs everywhere; batched_mm gathers
    each token's experts; eager loops over the experts that received tokens."""
    if getattr(config, "model_type", None) in MOE_MODEL_TYPES:
        config._experts_implementation = model_cfg.experts_implementation


def moe_blocks(model) -> list[torch.nn.Module]:
    """The MoE blocks (router + routed experts + shared expert), each the parent of one router."""
    return [m for m in model.modules() if is_router(getattr(m, "gate", None)) and hasattr(m, "experts")]


def prepare(model, zero_stage: int, experts_implementation: str, ep_size: int = 1) -> list[str]:
    """After the method made the model trainable, before deepspeed.initialize: under ZeRO-3 each MoE
    block becomes a leaf module (its parameters are gathered together on entry). Without that, a per-expert
    loop (eager) hangs at the first step on 2 ranks: ranks route to different experts, so their parameter
    fetch orders diverge and the collectives mismatch. grouped_mm does not hang, but the leaf costs it
    nothing (it gathers every expert anyway). Returns the lines to log; none for a dense model."""
    blocks = moe_blocks(model)
    if not blocks:
        return []
    classes = sorted({type(b) for b in blocks}, key=lambda c: c.__name__)
    lines = [
        f"MoE: {len(blocks)} MoE layers, {blocks[0].gate.num_experts} routed experts top-{blocks[0].gate.top_k}; "
        f"experts_implementation={experts_implementation}"
    ]
    if ep_size > 1:
        lines[0] += (
            f"; expert parallelism: each rank holds {blocks[0].gate.num_experts // ep_size} of them "
            f"(DeepSpeed AutoEP over {ep_size} ranks)"
        )
    elif zero_stage == 3:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, classes)
        lines[0] += f"; ZeRO-3 leaf modules: {', '.join(c.__name__ for c in classes)}"
    lines.append(f"MoE: {describe(model)}")
    if any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules()):
        # bitsandbytes quantizes nn.Linear layers; it has no quantized 3-D parameter for the routed experts.
        experts = [p for b in blocks for p in b.experts.parameters() if len(getattr(p, "ds_shape", p.shape)) == 3]
        n = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in experts)
        lines.append(
            f"MoE: bitsandbytes quantized the Linear layers; the routed experts ({n:,} parameters) stay in "
            f"{experts[0].dtype} (bitsandbytes has no quantized 3-D weights), so QLoRA saves less memory here"
        )
    return lines


class RoutingStats:
    """Tokens per routed expert, per MoE layer, summed over the micro-batches of the logging window and
    over all ranks at logging time (one all-reduce of one tensor), plus the router's mean top-k score
    (the sigmoid score of the chosen experts, before normalisation and routed_scaling_factor: after
    them every token's weights sum to the same constant). Padding positions are not counted.

    Only the training forward between `set_batch(mask)` and `set_batch(None)` counts: evaluation, the
    recomputed forward of gradient checkpointing (during backward) and a no-grad reference forward
    (preference training) do not."""

    def __init__(self, model):
        named = [(name, m) for name, m in model.named_modules() if is_router(m)]
        self.routers = [m for _, m in named]
        # The decoder layer each router sits in (its metrics' name); the router's ordinal otherwise.
        self.layers = [int(g[1]) if (g := re.search(r"layers\.(\d+)\.", n)) else i for i, (n, _) in enumerate(named)]
        self.mask = None  # the current micro-batch's non-pad mask, flattened; None outside a training forward
        self.counts = None
        self.weight_sums = None
        if not self.routers:
            return
        n = self.routers[0].num_experts
        self.counts = torch.zeros(len(self.routers), n, dtype=torch.float64)
        self.step_counts = torch.zeros(len(self.routers), n, dtype=torch.float64)  # this step's, for the bias
        self.weight_sums = torch.zeros(len(self.routers), 2, dtype=torch.float64)  # (sum of top-k weights, tokens)
        for i, router in enumerate(self.routers):
            router.register_forward_hook(self._hook(i))

    def __bool__(self) -> bool:
        return bool(self.routers)

    def set_batch(self, attention_mask) -> None:
        self.mask = None if attention_mask is None else attention_mask.reshape(-1).bool()

    def _hook(self, i: int):
        def record(module, inputs, output):
            if self.mask is None or not module.training or not isinstance(output, tuple) or len(output) != 3:
                return
            if not torch.is_grad_enabled():  # a reference forward (preference training) is not the one trained
                return
            with torch.no_grad():
                if hasattr(module, "route_scale"):
                    # DeepSpeed AutoEP's router (expert parallelism) returns (weights, indices, counts) and
                    # no logits; its gate is the same Linear, so the logits are recomputed (one small matmul).
                    indices, logits = output[1], module.gate(inputs[0])
                else:  # transformers' GLM routers: (logits, weights, indices)
                    logits, indices = output[0], output[2]
                if self.mask.numel() == indices.shape[0]:
                    mask = self.mask.to(indices.device)
                    indices, logits = indices[mask], logits[mask]
                n = self.counts.shape[1]
                counts = torch.bincount(indices.reshape(-1).long().cpu(), minlength=n).double()
                self.counts[i] += counts
                self.step_counts[i] += counts
                chosen = logits.float().sigmoid().gather(1, indices.long())
                self.weight_sums[i, 0] += chosen.mean(dim=-1).sum().item()
                self.weight_sums[i, 1] += chosen.shape[0]

        return record

    def update_biases(self, rate: float, all_reduce_sum) -> None:
        """Auxiliary-loss-free load balancing (DeepSeek-V3, used by GLM-4.5): after each optimizer step,
        every router's e_score_correction_bias moves by `rate` towards balance, +rate for an expert that got
        fewer tokens than the mean over the step's global batch, -rate for one that got more. Collective
        (one all-reduce); every rank applies the same update to its copy (ZeRO-3 does not partition
        buffers), and checkpoints and the saved model carry the bias."""
        if not self.routers:
            return
        if rate > 0:
            load = all_reduce_sum(self.step_counts)
            for router, counts in zip(self.routers, load, strict=True):
                if counts.sum() > 0:  # a router that did not run (PEFT's spare copy) keeps its bias
                    bias = router.e_score_correction_bias
                    bias.add_((rate * torch.sign(counts.mean() - counts)).to(bias.device, bias.dtype))
        self.step_counts.zero_()

    def flush(self, all_reduce_sum) -> dict[str, float]:
        """Metrics of the window since the last flush (global over ranks), then reset. `all_reduce_sum`
        returns a CPU tensor summed over ranks; every rank calls this at the same steps."""
        if not self.routers:
            return {}
        both = all_reduce_sum(torch.cat([self.counts, self.weight_sums], dim=1))
        n = self.counts.shape[1]
        counts, sums = both[:, :n], both[:, n:]
        self.counts.zero_()
        self.weight_sums.zero_()
        out = {}
        for layer, c, s in zip(self.layers, counts, sums, strict=True):
            if c.sum() == 0:
                continue
            mean = c.mean()
            tag = f"routing/layer{layer:02d}"
            out[f"{tag}/tokens_per_expert_min"] = c.min().item()
            out[f"{tag}/tokens_per_expert_max"] = c.max().item()
            out[f"{tag}/tokens_per_expert_cv"] = (c.std(unbiased=False) / mean).item()
            out[f"{tag}/experts_without_tokens"] = int((c == 0).sum().item())
            out[f"{tag}/mean_topk_score"] = (s[0] / s[1]).item() if s[1] else 0.0
        if out:
            cvs = [v for k, v in out.items() if k.endswith("_cv")]
            out["routing/tokens_per_expert_cv_max"] = max(cvs)
            out["routing/experts_without_tokens"] = sum(v for k, v in out.items() if k.endswith("without_tokens"))
        return out


EXTRA_FILE = "model-extra-layers.safetensors"


def unloaded_layer_tensors(source: Path) -> dict[str, str]:
    """Tensors of `source` (a model directory) in decoder layers beyond num_hidden_layers, which
    transformers does not load: GLM-4.5's multi-token-prediction (MTP) layer, which serving engines use
    for speculative decoding. Maps each name to the file that holds it."""
    try:
        config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    layers = config.get("num_hidden_layers")
    index = source / "model.safetensors.index.json"
    if index.is_file():
        where = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
    elif (source / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(source / "model.safetensors"), framework="pt") as f:
            where = dict.fromkeys(f.keys(), "model.safetensors")
    else:
        return {}
    pattern = re.compile(r"^model\.layers\.(\d+)\.")
    return {
        k: v for k, v in where.items() if (m := pattern.match(k)) and isinstance(layers, int) and int(m[1]) >= layers
    }


def carry_unloaded_tensors(source, out: Path) -> str | None:
    """Copy the tensors transformers did not load (`unloaded_layer_tensors`) from `source` into `out`
    unchanged (same bytes, same dtype), in their own file, listed in out's index (written if `out` has a
    single model.safetensors), so an exported model keeps everything its checkpoint had. Returns a line
    to log, or None when there was nothing to carry."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    source = Path(source)
    extra = unloaded_layer_tensors(source)
    if not extra or Path(out).resolve() == source.resolve():
        return None
    tensors = {}
    for file in sorted(set(extra.values())):
        with safe_open(str(source / file), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in extra if extra[k] == file})
    save_file(tensors, str(out / EXTRA_FILE), metadata={"format": "pt"})
    index = out / "model.safetensors.index.json"
    if index.is_file():
        spec = json.loads(index.read_text(encoding="utf-8"))
    else:
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            spec = {"metadata": {}, "weight_map": dict.fromkeys(f.keys(), "model.safetensors")}
    spec["weight_map"].update(dict.fromkeys(tensors, EXTRA_FILE))
    index.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    layers = sorted({int(k.split(".")[2]) for k in tensors})
    return (
        f"kept {len(tensors)} tensors of layer(s) {', '.join(map(str, layers))} that transformers does not load "
        f"(the multi-token-prediction layer) unchanged in {EXTRA_FILE}"
    )


def expert_parallel_layers(module) -> list[tuple[str, torch.nn.Module]]:
    """DeepSpeed AutoEP's replacements of the MoE blocks (each holds 1/ep_size of the routed experts)."""
    return [(name, m) for name, m in module.named_modules() if hasattr(m, "expert_placement_descriptor")]


def gather_expert_parallel(module, state_dict: dict) -> dict:
    """Collective. `state_dict` (rank 0's gathered parameters, others' {}) with every AutoEP layer put
    back into transformers' names and shapes: each rank's local experts all-gathered over its expert
    group and placed by DeepSpeed's own placement map, `experts.w1`/`w3`/`w2` (E_local, ...) back to
    `experts.gate_up_proj` (E, 2I, H: gate rows, then up rows) and `experts.down_proj`, and the router's
    `router.gate.weight` / `router.e_score_correction_bias` back to `gate.*`. A model without expert
    parallelism is returned unchanged."""
    from contextlib import nullcontext

    import deepspeed
    from deepspeed.checkpoint.autoep_affine import autoep_experts_for_rank

    from dist_glm.checkpointing.weights import to_transformers_names
    from dist_glm.runtime import collectives

    main = collectives.is_main_process()
    for prefix, layer in expert_parallel_layers(module):
        full = {}
        for w in ("w1", "w2", "w3"):
            p = getattr(layer.experts, w)
            gather = (
                deepspeed.zero.GatheredParameters([p], modifier_rank=None) if hasattr(p, "ds_id") else nullcontext()
            )
            with gather:
                local = p.detach().float().clone()
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else local.device
            parts = [torch.empty_like(local, device=device) for _ in range(layer.ep_size)]
            torch.distributed.all_gather(parts, local.to(device), group=layer.ep_group)
            out = torch.empty(layer.num_experts, *local.shape[1:])
            for rank, part in enumerate(parts):
                out[list(autoep_experts_for_rank(layer.expert_placement_descriptor, rank))] = part.cpu()
            full[w] = out.to(p.dtype)
        if main:
            state_dict = to_transformers_names(state_dict, prefix, full)
    return state_dict
