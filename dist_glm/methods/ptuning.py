"""P-tuning v2 (deep prefix tuning, as ChatGLM's recipe): `pre_seq_len` trained key/value vectors are
prepended to the attention of every layer, optionally produced by a two-layer MLP
(`prefix_projection`). Built on PEFT prefix tuning; the base model is frozen.

As in THUDM's own P-tuning v2 (ChatGLM2/3, glm-4-9b-chat), the text's positions start at 0 after the prefix:
the prefix keys carry no rotary position, so a query at position p sees them the same way whatever came
before. PEFT would number the text after the prefix (p + pre_seq_len) and drops position ids given to it;
`prefix_as_thudm` restores THUDM's numbering, in training and in generation (tests/test_chatglm_layouts.py
compares with THUDM's code).

The artifact is the prefix alone (PEFT's `prompt_embeddings`: pre_seq_len x layers x 2 x kv width,
KB-MB), reloadable with `PeftModel.from_pretrained(base, out_dir)`.
"""

import functools

import torch

from dist_glm.methods import full

trainable_only = True
export_trainable_only = True
is_adapter = True
can_pack = False  # one prefix per row: packed samples would share its attention window
export_refusal = (
    "a P-tuning v2 prefix cannot be merged into model weights (it adds key/value vectors to every attention "
    "layer, not a weight change); use it as it is: chat.py, evaluate.py and "
    "dist_glm.models.artifacts.load_for_inference take the same --model_name_or_path/--adapter_name_or_path as here"
)
quantization_config = full.quantization_config
inference_quantization = full.inference_quantization


def after_load(model) -> None:
    prefix_as_thudm(model)


def published_tensors(adapter_dir) -> dict:
    """THUDM's P-tuning v2 checkpoint holds the prefix encoder; without projection its embedding is the prefix
    itself, laid out as this artifact's (tokens x layers x key/value x groups x head size), so the saved prefix
    (the encoder's output, whatever projection trained it) is that embedding."""
    from pathlib import Path

    from safetensors.torch import load_file

    prefix = load_file(Path(adapter_dir) / "adapter_model.safetensors")["prompt_embeddings"]
    return {"transformer.prefix_encoder.embedding.weight": prefix}


def prefix_as_thudm(peft_model) -> None:
    """What THUDM's P-tuning v2 does, on PEFT's prefix: the text's positions start at 0 after the prefix, in
    training and in generation; and in generation the prefix is really attended to (transformers 5 generates
    with its own `cache=` argument, which wins over the prefix PEFT passes as `past_key_values`: the prefix
    was silently ignored). A forward pre-hook on the base model, so every caller (the training step, PEFT's
    forward, generate) goes through it. Once per model: a training checkpoint is rebuilt with make_trainable and
    then given after_load, and a second hook would move the positions twice."""
    base = peft_model.get_base_model()
    if getattr(base, "_dist_glm_prefix_as_thudm", False):
        return
    base._dist_glm_prefix_as_thudm = True
    n = peft_model.peft_config["default"].num_virtual_tokens

    def with_prefix(module, args, kwargs):
        cache, prefix = kwargs.get("cache"), kwargs.get("past_key_values")
        if cache is not None and prefix is not None:
            kwargs.pop("past_key_values")
            if cache.get_seq_length() == 0:  # generation's first step: the prefix goes in first
                for layer_idx, layer in enumerate(prefix.layers):
                    cache.update(layer.keys, layer.values, layer_idx)
        if kwargs.get("position_ids") is not None:
            # Only generation gives them (PEFT drops any given to its forward), counted by transformers over the
            # attention mask PEFT has extended with the prefix's columns: n too many. (ChatGLM-6B's generation
            # gives its own 2-D positions, counted from the ids alone: B x 2 x T, left as they are.)
            if kwargs["position_ids"].dim() == 2:
                kwargs["position_ids"] = (kwargs["position_ids"] - n).clamp(min=0)
            return args, kwargs
        inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if inputs is None and args:
            inputs = args[0]
        mask = kwargs.get("attention_mask")
        if inputs is not None and mask is not None and mask.dim() == 2:
            seen = mask[:, n:].long().cumsum(-1)  # the prefix's columns come first
            kwargs["position_ids"] = (seen - 1).clamp(min=0)[:, -inputs.shape[1] :]
        return args, kwargs

    base.register_forward_pre_hook(with_prefix, with_kwargs=True)


def check_config(cfg) -> list[str]:
    if cfg.data.packing:
        return [
            "packing=true with finetuning_type=ptuning: packed samples would share one prefix attention "
            "window; set packing=false (or use lora, which packs)"
        ]
    return check_attention_kind(cfg.model)


def check_attention_kind(model_cfg) -> list[str]:
    """A prefix is per-layer keys and values of one shape; multi-latent attention (GLM-4.7-Flash, GLM-5:
    `kv_lora_rank` in config.json) has keys and values of different head sizes from a compressed latent,
    which PEFT's prefix does not produce. Refused before anything loads."""
    import json
    from pathlib import Path

    f = Path(model_cfg.model_name_or_path) / "config.json"
    try:
        config = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
    except (OSError, ValueError):
        return []  # reported where the model loads
    if config.get("kv_lora_rank"):
        return [
            f"finetuning_type=ptuning: model_type {config.get('model_type')} uses multi-latent attention (keys and "
            "values of different sizes, from a compressed latent), where a P-tuning v2 prefix does not fit; use "
            "finetuning_type=lora"
        ]
    return []


def owns_adapter(adapter_dir, adapter_config: dict) -> bool:
    return adapter_config.get("peft_type") == "PREFIX_TUNING"


@functools.cache
def _prefix_cache_class():
    from transformers import DynamicCache

    class PrefixCache(DynamicCache):
        """Read-only view of the prefix keys/values: each layer attends over cat(prefix, own keys) while
        the cache never grows. PEFT hands the model a growing DynamicCache, which transformers drops under
        gradient checkpointing (a recomputed layer would append twice); a read-only one gives the same
        attention with or without checkpointing, so checkpointing is allowed to keep it."""

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            # Extra arguments (cache_kwargs before transformers 5.2x, kwargs= after) do not matter to a
            # read-only view.
            layer = self.layers[layer_idx]
            return (
                torch.cat([layer.keys.to(key_states.dtype), key_states], dim=-2),
                torch.cat([layer.values.to(value_states.dtype), value_states], dim=-2),
            )

    return PrefixCache


def read_only(cache):
    cache.__class__ = _prefix_cache_class()  # same data, read-only update()
    return cache


def make_trainable(model, cfg):
    from peft import PrefixTuningConfig, get_peft_model

    m = cfg.method
    config = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=m.pre_seq_len,
        prefix_projection=m.prefix_projection,
        encoder_hidden_size=m.prefix_hidden_size,
    )
    kv_heads = getattr(model.config, "num_key_value_heads", None)
    if kv_heads:  # grouped-query attention (GLM-4: 2 KV heads): the prefix has the KV width, not the query width
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        config.num_attention_heads = kv_heads
        config.token_dim = kv_heads * head_dim
    peft_model = get_peft_model(model, config)
    get_prompt = peft_model.get_prompt

    def get_prompt_for_training(*args, **kwargs):
        cache = get_prompt(*args, **kwargs)
        return read_only(cache) if peft_model.training else cache  # generation needs a growing cache

    peft_model.get_prompt = get_prompt_for_training
    for module in peft_model.modules():
        if hasattr(module, "_can_checkpoint_with_cache"):
            module._can_checkpoint_with_cache = True  # the cache is read-only during training (read_only)
    prefix_as_thudm(peft_model)
    return peft_model


def adapter_settings(adapter_dir) -> dict:
    """A saved prefix is the encoder's output (save_artifact): it continues as a direct prefix of the
    same length, whatever projection produced it (the MLP reparametrises training; its output is the
    prefix the model saw)."""
    import json
    from pathlib import Path

    c = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    return {"pre_seq_len": int(c["num_virtual_tokens"]), "prefix_projection": False}


def continue_adapter(model, adapter_dir, cfg):
    from pathlib import Path

    from safetensors.torch import load_file

    peft_model = make_trainable(model, cfg)  # cfg already holds adapter_settings (dist_glm.training.continued)
    saved = load_file(Path(adapter_dir) / "adapter_model.safetensors")["prompt_embeddings"]
    embedding = peft_model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        embedding.copy_(saved.to(embedding.dtype))
    return peft_model


def save_artifact(model, state_dict: dict, tokenizer, out_dir) -> None:
    """Rank 0 only. The prefix is computed from the gathered encoder weights in `state_dict` on a
    fresh encoder, never from the live (possibly ZeRO-3 partitioned) module."""
    import copy
    from pathlib import Path

    from peft.tuners.prefix_tuning import PrefixEncoder
    from safetensors.torch import save_file

    config = copy.deepcopy(model.peft_config["default"])
    config.inference_mode = False
    encoder = PrefixEncoder(config)
    prefix = "prompt_encoder.default."
    encoder.load_state_dict({k[len(prefix) :]: v.float() for k, v in state_dict.items() if k.startswith(prefix)})
    with torch.no_grad():
        embeddings = encoder(torch.arange(config.num_virtual_tokens).unsqueeze(0))[0]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"prompt_embeddings": embeddings.contiguous()}, out / "adapter_model.safetensors")
    config.inference_mode = True
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
