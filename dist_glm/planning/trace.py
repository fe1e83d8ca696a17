"""What the memory planner (dist_glm.planning.planner) measures without weights: the model built on the meta device
from its config.json, the recipe's method applied to it, and one forward pass at the recipe's batch
shape whose saved-for-backward tensors are counted.

Nothing here is a formula of the architecture: parameter counts are those of the built model after the
method marked what trains (so LoRA targets, freeze layers, P-tuning prefixes and tied weights count
exactly), and the activations are the tensors autograd keeps, layer by layer, for this method (a frozen
linear layer keeps no input, layers before the first trainable one keep nothing). Meta tensors have
shapes and no data, so tracing GLM-4-9B at 8 x 2048 tokens takes a second and no memory.

The one stand-in is attention. On meta, PyTorch's attention would take the math path and keep a
B x heads x T x T matrix that the kernels training runs with (flash / memory-efficient on CUDA, the
flash kernel on CPU) never build; they keep q, k, v, the output and one fp32 log-sum-exp per query
and head, which is what `_FlashLike` keeps.
"""

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dist_glm.errors import UserError

ATTENTION_NAME = "dist_glm_plan"
# Published config.json files of real GLM checkpoints (assets/model_configs/SOURCES.md): facts to plan with.
KNOWN_CONFIGS = Path(__file__).resolve().parents[2] / "assets" / "model_configs"


def known_config_dir(model_name_or_path: str, model: str = "") -> Path | None:
    """The shipped config of `model`, or of the model `model_name_or_path` names when that is no local
    directory (`/models/glm-4-9b-chat-hf`, `THUDM/glm-4-9b-chat-hf`); None otherwise."""
    name = model or (Path(model_name_or_path).name if not Path(model_name_or_path, "config.json").is_file() else "")
    found = KNOWN_CONFIGS / name if name else None
    return found if found is not None and (found / "config.json").is_file() else None


@dataclass
class Trace:
    total_params: int  # every parameter, at full (unpartitioned) size
    trainable_params: int
    quantized_params: int  # frozen weights a QLoRA base stores in 4 or 8 bits
    largest_module_params: int  # the most ZeRO-3 gathers at once for one module (the embedding, usually)
    largest_trainable_params: int  # the largest module gradient autograd makes whole before ZeRO 2-3 reduce it
    small_params: int  # parameters under ZeRO-3's persistence threshold: whole on every rank
    layer_saved_bytes: list[int] = field(default_factory=list)  # per decoder layer, kept for backward
    outside_saved_bytes: int = 0  # kept for backward outside the decoder layers (embedding, final norm)
    layer_input_bytes: int = 0  # one layer's input hidden states (what gradient checkpointing keeps)
    hidden_size: int = 0
    vocab_size: int = 0
    # Mixture-of-Experts GLMs (0 for a dense one): the routed experts' parameters (all layers), the experts
    # per MoE layer and how many each token uses.
    expert_params: int = 0
    experts: int = 0
    top_k: int = 0
    trainable_expert_params: int = 0

    @property
    def active_params(self) -> int:
        """Parameters one token goes through: all but the routed experts it is not sent to."""
        return self.total_params - (
            self.expert_params - self.expert_params * self.top_k // self.experts if self.experts else 0
        )


class _FlashLike(torch.autograd.Function):
    """Attention that keeps what the fused kernels keep: q, k, v, output, an fp32 log-sum-exp, and the
    padding mask that PyTorch converts from boolean to an additive B x 1 x T x T mask in the dtype at
    every call (measured on CPU: 8 MiB a layer at 16 x 512 tokens; CUDA's memory-efficient kernel, the
    one that takes a mask, keeps it as its bias the same way)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        mask = torch.empty(q.shape[0], 1, q.shape[2], k.shape[2], dtype=q.dtype, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the trace stops after the forward pass
        q, k, v, *_ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        # Training batches are padded, so transformers passes a mask, and with a mask it repeats the KV
        # heads to the query heads before attention (sdpa_attention_forward): those copies are kept.
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    return _FlashLike.apply(query, key, value).transpose(1, 2).contiguous(), None


# Far above any real GLM (GLM-5: 78 layers, hidden 6144, vocabulary 154,880): a config beyond these is a
# typo, and building it, even on the meta device, would take minutes before anything is printed.
SIZE_LIMITS = {
    "num_hidden_layers": 1_000,
    "hidden_size": 65_536,
    "intermediate_size": 1_048_576,
    "vocab_size": 4_000_000,
    "num_attention_heads": 1_024,
    "num_key_value_heads": 1_024,
    "n_routed_experts": 4_096,
    "num_experts": 4_096,
}


def check_sizes(config_file) -> None:
    """The sizes the planner reads from config.json are positive whole numbers of a buildable model."""
    import json

    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{config_file}: the top level must be a JSON object")
    problems = []
    for key, limit in SIZE_LIMITS.items():
        if key not in raw or raw[key] is None:
            continue
        value = raw[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{config_file}: {key}={json.dumps(value)} must be a positive whole number")
        elif value > limit:
            problems.append(
                f"{config_file}: {key}={value:,} is beyond any real model (the planner accepts up to {limit:,}); "
                "check the file"
            )
    if problems:
        raise UserError(problems)


def build_meta_model(model_cfg, method_cfg_holder):
    """The causal LM on the meta device with the recipe's method applied; UserError when config.json
    is missing or cannot be built."""
    from transformers import AttentionInterface, AutoModelForCausalLM

    from dist_glm.methods import get_method
    from dist_glm.models.loading import load_config

    path = model_cfg.model_name_or_path
    if not (Path(path) / "config.json").is_file():
        known = sorted(p.parent.name for p in KNOWN_CONFIGS.glob("*/config.json"))
        raise UserError(
            f"model_name_or_path='{path}': no config.json there; point it at a local checkpoint directory (the "
            f"planner needs only its config.json: `hf download REPO config.json --local-dir DIR`), or name a "
            f"shipped one with --model ({', '.join(known)})"
        )
    check_sizes(Path(path) / "config.json")
    AttentionInterface.register(ATTENTION_NAME, _attention)
    try:
        config = load_config(path, model_cfg.trust_remote_code)
        config.use_cache = False
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"model_name_or_path='{path}': cannot build the model ({str(e).splitlines()[0]})") from None
    model.config._attn_implementation = ATTENTION_NAME
    method = get_method(method_cfg_holder.method.finetuning_type)
    # A method that quantizes its base (QLoRA) prepares an unquantized model like LoRA does: the same
    # adapters, and the storage of the frozen weights is counted from their names (count_parameters).
    quantized_base = method.quantization_config(method_cfg_holder) is not None
    with torch.device("meta"):
        model = method.make_trainable(model, method_cfg_holder)
    return model, quantized_base


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _decoder_layers(lm) -> list:
    n = lm.config.num_hidden_layers
    for module in lm.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return list(module)
    raise UserError(f"model type {lm.config.model_type}: the planner found no list of {n} decoder layers")


def _storage_key(t: torch.Tensor):
    # Views of one tensor share a storage; on meta its address is 0 for all, so the storage object's
    # own identity tells them apart.
    return t.untyped_storage()._cdata


def count_parameters(model, quantized_base: bool) -> dict:
    from transformers.pytorch_utils import Conv1D

    total = trainable = quantized = small = largest = largest_trainable = 0
    seen = set()
    head = _base(model).get_output_embeddings()
    for module in model.modules():  # the PEFT wrapper's too: a P-tuning prefix encoder lives there
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        size = sum(p.numel() for p in own)
        largest = max(largest, size)
        largest_trainable = max(largest_trainable, sum(p.numel() for p in own if p.requires_grad))
        for p in own:
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
            small += p.numel() if p.numel() < 100_000 else 0  # DeepSpeed's stage3_param_persistence_threshold
        # bitsandbytes replaces every linear layer but the LM head; their frozen weights are the ones stored
        # in 4/8 bits (the LoRA layers wrap them, so the frozen `base_layer` is what gets quantized).
        if quantized_base and isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head:
            quantized += sum(p.numel() for p in own if not p.requires_grad and p.dim() == 2)
    experts = [(m, p) for m in model.modules() if type(m).__name__.endswith("Experts") for p in m.parameters()]
    routers = [m for m in model.modules() if hasattr(m, "e_score_correction_bias") and hasattr(m, "top_k")]
    return {
        "expert_params": sum(p.numel() for _, p in experts if p.dim() == 3),
        "trainable_expert_params": sum(p.numel() for _, p in experts if p.requires_grad),
        "experts": routers[0].num_experts if routers else 0,
        "top_k": routers[0].top_k if routers else 0,
        "total_params": total,
        "trainable_params": trainable,
        "quantized_params": quantized,
        "largest_module_params": largest,
        "largest_trainable_params": largest_trainable,
        "small_params": small,
    }


@contextmanager
def _autocast_off_on_meta():
    """PEFT's LoRA on 3-D expert weights opens `torch.autocast(device_type=<the weight's device>,
    enabled=False)`, which torch refuses for the meta device; disabled autocast does nothing, so while
    tracing it is opened for the CPU instead."""
    real = torch.autocast

    class Autocast(real):
        def __init__(self, device_type, *args, **kwargs):
            super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)

    torch.autocast = Autocast
    try:
        yield
    finally:
        torch.autocast = real


def trace(cfg) -> Trace:
    """Parameter counts and the forward pass's saved bytes for `cfg` (a training Config), on meta."""
    model, quantized_base = build_meta_model(cfg.model, cfg)
    counts = count_parameters(model, quantized_base)
    lm = _base(model)
    layers = _decoder_layers(lm)
    batch, tokens = cfg.train.per_device_train_batch_size, cfg.data.cutoff_len
    saved: dict[object, tuple[int, int]] = {}  # storage -> (bytes, layer index or -1)
    where = [-1]

    def pack(t):
        key = _storage_key(t)
        if key not in params and key not in saved:
            saved[key] = (t.untyped_storage().nbytes(), where[0])
        return t

    def enter(i):
        return lambda module, args, kwargs=None: where.__setitem__(0, i)

    hooks = [layer.register_forward_pre_hook(enter(i)) for i, layer in enumerate(layers)]
    hooks += [layer.register_forward_hook(lambda *a: where.__setitem__(0, -1)) for layer in layers]
    base_params = {id(p) for p in lm.parameters()}
    if any(p.requires_grad and id(p) not in base_params for p in model.parameters()):
        # Trained parameters outside the base model (P-tuning's prefix encoder) join every layer's
        # attention, so gradients flow through all of them; the embedding output requiring grad makes the
        # trace keep the same tensors.
        hooks.append(lm.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_()))
    ids = torch.zeros(batch, tokens, dtype=torch.long, device="meta")
    dtype = cfg.train.dtype
    lm.to(dtype)  # activations are in the training dtype (QLoRA computes in it too)
    params = {_storage_key(p) for p in model.parameters()}  # after .to(): weights are not activations
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast_off_on_meta():
            backbone = getattr(lm, lm.base_model_prefix, None) or lm.model
            backbone(input_ids=ids, use_cache=False)
    except (RuntimeError, NotImplementedError, TypeError) as e:
        raise UserError(
            f"model type {lm.config.model_type}: the planner cannot trace this architecture on the meta device "
            f"({str(e).splitlines()[0]}); plan with a native GLM checkpoint (GlmForCausalLM, Glm4ForCausalLM)"
        ) from None
    finally:
        for h in hooks:
            h.remove()
    per_layer = [0] * len(layers)
    outside = 0
    for nbytes, layer in saved.values():
        if layer < 0:
            outside += nbytes
        else:
            per_layer[layer] += nbytes
    hidden = lm.config.hidden_size
    return Trace(
        **counts,
        layer_saved_bytes=per_layer,
        outside_saved_bytes=outside,
        layer_input_bytes=batch * tokens * hidden * torch.finfo(dtype).bits // 8,
        hidden_size=hidden,
        vocab_size=lm.config.vocab_size,
    )
