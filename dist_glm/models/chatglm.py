"""The ChatGLM line in the layouts THUDM published (config.json with an `auto_map` to the checkpoint's own
Python), loaded without running that Python.

ChatGLM2-6B, ChatGLM3-6B (with their -base and -32k variants) and glm-4-9b-chat (not -hf) are GLM-4's
architecture under other names: one fused query/key/value matrix over grouped ("multi-query") keys, rotary
embeddings on the first half of each head in interleaved pairs with base 10000 * rope_ratio, RMSNorm, a
SwiGLU MLP whose fused matrix is [gate; up], an untied output layer over a vocabulary padded past the
tokenizer's. They load as transformers' native `GlmForCausalLM`: the config is translated here and the
weights are renamed and split while transformers reads them (its conversion mapping), so ZeRO-3
partitioning, quantization and dtype handling stay transformers' own. Everything written afterwards
(checkpoints, exports) is the native layout, which every tool loads.

The tokenizer is built from the checkpoint's `tokenizer.model` (sentencepiece for ChatGLM2/3, tiktoken ranks
for glm-4-9b-chat) with every special token at the id THUDM's tokenizer gives it (models/chatglm_tokenizer.py).
What THUDM's code does was established once from that code and is kept as facts, with reference outputs, in
tests/data/chatglm/.

ChatGLM-6B (the first one) is another architecture (2-D positions, GeLU, scaled residuals): it loads into
dist_glm's own implementation of it (models/chatglm6b.py), under THUDM's weight names, with its tokenizer
(models/chatglm6b_tokenizer.py).
"""

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_glm.errors import UserError


@dataclass(frozen=True)
class Layout:
    """A checkpoint directory in one of THUDM's published ChatGLM layouts."""

    name: str  # chatglm2, chatglm3, glm4chat (GLM-4 architecture) or chatglm (ChatGLM-6B)
    path: Path
    config: dict  # config.json as published


def detect(path) -> Layout | None:
    """The ChatGLM layout of a checkpoint directory, None for anything else (native layouts included)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("model_type") != "chatglm":
        return None
    if "multi_query_group_num" not in config and "padded_vocab_size" not in config:
        return Layout("chatglm", Path(path), config)
    if _is_tiktoken(Path(path) / "tokenizer.model") or config.get("padded_vocab_size") == 151552:
        return Layout("glm4chat", Path(path), config)
    return Layout("chatglm3" if _says_chatglm3(Path(path), config) else "chatglm2", Path(path), config)


def _is_tiktoken(file: Path) -> bool:
    """tiktoken ranks are text lines `<base64 bytes> <rank>`; a sentencepiece model is a binary protobuf."""
    if not file.is_file():
        return False
    with open(file, "rb") as f:
        head = f.read(256).split(b"\n", 1)[0]
    return re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", head) is not None


def _says_chatglm3(path: Path, config: dict) -> bool:
    """ChatGLM2 and ChatGLM3 share config keys and sentencepiece model; only ChatGLM3's tokenizer knows the
    role tokens. Its tokenization_chatglm.py is read as text (never run); the published name decides
    when that file is gone."""
    code = path / "tokenization_chatglm.py"
    if code.is_file():
        return "<|observation|>" in code.read_text(encoding="utf-8", errors="replace")
    names = [config.get("_name_or_path", "")]
    tok_config = path / "tokenizer_config.json"
    if tok_config.is_file():
        names.append(str(json.loads(tok_config.read_text(encoding="utf-8")).get("name_or_path", "")))
    return any("chatglm3" in str(n).lower() for n in names)


def check_supported(layout: Layout) -> None:
    """Refuse what this translation does not reproduce, before anything loads."""
    where = f"model_name_or_path='{layout.path}'"
    c = layout.config
    unsupported = {
        "quantization_bit": (c.get("quantization_bit") or 0) != 0,  # THUDM's int4/int8 packed weights
        "pre_seq_len": c.get("pre_seq_len") is not None,  # a P-tuning v2 prefix saved into the config
    }
    if layout.name == "chatglm":  # ChatGLM-6B: models/chatglm6b.py
        unsupported["position_encoding_2d"] = c.get("position_encoding_2d", True) is not True
    else:
        unsupported.update({
            "apply_residual_connection_post_layernorm": bool(c.get("apply_residual_connection_post_layernorm")),
            "add_bias_linear": bool(c.get("add_bias_linear")),
            "rmsnorm": c.get("rmsnorm", True) is not True,
            "post_layer_norm": c.get("post_layer_norm", True) is not True,
            "original_rope": c.get("original_rope", True) is not True,
        })  # fmt: skip
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise UserError(
            f"{where}/config.json: {bad[0]}={c.get(bad[0])!r} is not a published ChatGLM-6B/ChatGLM2/ChatGLM3/"
            "glm-4-9b-chat setting dist_glm reproduces; use the full-precision checkpoint as THUDM published it"
        )


def native_config(layout: Layout):
    """The GlmConfig that computes what THUDM's ChatGLMModel computes with `layout.config`."""
    from transformers import GlmConfig

    check_supported(layout)
    c = layout.config
    heads = c["num_attention_heads"]
    head_dim = c.get("kv_channels") or c["hidden_size"] // heads
    config = GlmConfig(
        vocab_size=c["padded_vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["ffn_hidden_size"],
        num_hidden_layers=c["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=c["multi_query_group_num"] if c.get("multi_query_attention") else heads,
        head_dim=head_dim,
        max_position_embeddings=c.get("seq_length", 8192),
        rms_norm_eps=c.get("layernorm_epsilon", 1e-5),
        # Rotary on half of each head, base 10000 scaled by rope_ratio (ChatGLM3-32k: 50, glm-4-9b-chat: 500).
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0 * float(c.get("rope_ratio", 1)),
            "partial_rotary_factor": 0.5,
        },
        attention_bias=bool(c.get("add_qkv_bias", False)),
        attention_dropout=float(c.get("attention_dropout", 0.0)),
        tie_word_embeddings=False,
        pad_token_id=c.get("pad_token_id"),
        eos_token_id=c.get("eos_token_id"),
        bos_token_id=None,
    )
    dtype = c.get("torch_dtype") or c.get("dtype")
    if dtype:
        config.dtype = dtype
    return config


# (published name, GlmForCausalLM name) of every weight; {i} is the layer index. The fused query/key/value matrix
# keeps a name of its own on the way in and is split into q_proj, k_proj, v_proj (and fused again on the way out).
NAMES = [
    ("transformer.embedding.word_embeddings", "model.embed_tokens"),
    ("transformer.encoder.layers.{i}.input_layernorm", "model.layers.{i}.input_layernorm"),
    ("transformer.encoder.layers.{i}.post_attention_layernorm", "model.layers.{i}.post_attention_layernorm"),
    ("transformer.encoder.layers.{i}.self_attention.query_key_value", "model.layers.{i}.self_attn.query_key_value"),
    ("transformer.encoder.layers.{i}.self_attention.dense", "model.layers.{i}.self_attn.o_proj"),
    ("transformer.encoder.layers.{i}.mlp.dense_h_to_4h", "model.layers.{i}.mlp.gate_up_proj"),
    ("transformer.encoder.layers.{i}.mlp.dense_4h_to_h", "model.layers.{i}.mlp.down_proj"),
    ("transformer.encoder.final_layernorm", "model.norm"),
    ("transformer.output_layer", "lm_head"),
]


def _pattern(name: str) -> str:
    return re.escape(name).replace(re.escape("{i}"), r"(\d+)")


def _replacement(name: str) -> str:
    return name.replace("{i}", r"\1")


def model_config(layout: Layout):
    """The config dist_glm builds `layout`'s model from: GlmConfig for the GLM-4 architecture, dist_glm's own
    ChatGLM-6B config for the first ChatGLM."""
    if layout.name != "chatglm":
        return native_config(layout)
    from dist_glm.models.chatglm6b import published_config, register_auto_classes

    check_supported(layout)
    register_auto_classes()  # so that AutoModelForCausalLM.from_config builds it (from scratch, the planner)
    try:
        return published_config(layout.path)
    except (TypeError, ValueError) as e:
        raise UserError(f"model_name_or_path='{layout.path}'/config.json: {str(e).splitlines()[0]}") from None


def from_pretrained(layout: Layout, config=None, **kwargs):
    """The published directory's weights in their model: GlmForCausalLM with the renaming applied while it
    loads; dist_glm's ChatGLM-6B, which holds THUDM's names as they are."""
    from transformers import GlmForCausalLM

    config = config if config is not None else model_config(layout)
    if layout.name == "chatglm":
        from dist_glm.models.chatglm6b import ChatGLM6BForCausalLM

        return ChatGLM6BForCausalLM.from_pretrained(layout.path, config=config, **kwargs)
    with conversions_for(GlmForCausalLM, config):
        model = GlmForCausalLM.from_pretrained(layout.path, config=config, **kwargs)
    forget_conversions(model)
    return model


def describe(layout: Layout) -> str:
    """The start-up line saying what was done with the directory."""
    if layout.name == "chatglm":
        how = "loaded into dist_glm's own ChatGLM-6B (models/chatglm6b.py) under THUDM's weight names, tokenizer "
        how += "built from ice_text.model"
    else:
        how = "loaded as GlmForCausalLM with its weights renamed on load and a tokenizer built from tokenizer.model"
    return f"{layout.name} layout (THUDM's published files): {how}; the checkpoint's own Python is not run"


def weight_conversions(config) -> list:
    """How the published weight names become GlmForCausalLM's: renamings, then the fused query/key/value
    matrix split into its three blocks (queries for every head, then keys, then values of each group)."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    return [WeightRenaming(_pattern(published), _replacement(native)) for published, native in NAMES] + [
        WeightConverter(
            source_patterns="self_attn.query_key_value",
            target_patterns=["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            operations=[_split_qkv_op(config)],
        )
    ]


def _split_qkv_op(config):
    from transformers.core_model_loading import Concatenate, ConversionOps

    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim

    class SplitQueryKeyValue(ConversionOps):
        """[q; k; v] along dim 0 at the sizes the config gives (not the parameters' shapes, which ZeRO-3 has
        already partitioned to nothing when this runs)."""

        def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
            (tensors,) = input_dict.values()
            tensor = tensors[0] if isinstance(tensors, list) else tensors
            parts = torch.split(tensor, [q, kv, kv], dim=0)
            return {target: part.contiguous() for target, part in zip(target_patterns, parts, strict=True)}

        @property
        def reverse_op(self):
            return Concatenate(0)

    return SplitQueryKeyValue()


@contextmanager
def conversions_for(model_class, config):
    """While loading: transformers applies `weight_conversions` to `model_class` (looked up by class name).
    Restored afterwards, so a native glm checkpoint loaded later is read as it is."""
    from transformers import conversion_mapping

    name = model_class.__name__
    previous = conversion_mapping.get_checkpoint_conversion_mapping(name)
    was_user = name in conversion_mapping.USER_REGISTERED_MAPPINGS
    conversion_mapping.register_checkpoint_conversion_mapping(name, weight_conversions(config), overwrite=True)
    # The rotary inverse frequencies saved with the weights are recomputed from the config.
    ignored = model_class._keys_to_ignore_on_load_unexpected
    model_class._keys_to_ignore_on_load_unexpected = [*(ignored or []), r"rotary_pos_emb\.inv_freq"]
    try:
        yield
    finally:
        model_class._keys_to_ignore_on_load_unexpected = ignored
        cache = conversion_mapping._checkpoint_conversion_mapping_cache
        if previous is None:
            cache.pop(name, None)
        else:
            cache[name] = previous
        if not was_user:
            conversion_mapping.USER_REGISTERED_MAPPINGS.discard(name)


def forget_conversions(model) -> None:
    """The loaded model saves in the native layout: transformers would otherwise reverse the renaming on
    save_pretrained and write ChatGLM names under a GlmForCausalLM config."""
    for module in model.modules():
        if hasattr(module, "_weight_conversions"):
            module._weight_conversions = []


def original_state_dict(state_dict: dict) -> dict:
    """GlmForCausalLM's weights under the published names, the query/key/value blocks fused again: the inverse
    of `weight_conversions` (tensors are shared, not copied, except the fused ones)."""
    out = {}
    for name, tensor in state_dict.items():
        fused = re.fullmatch(r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", name)
        if fused and fused.group(2) != "q":
            continue  # fused with q_proj's block
        if fused:
            layer, _, kind = fused.groups()
            name = f"model.layers.{layer}.self_attn.query_key_value.{kind}"
            tensor = torch.cat([state_dict[f"model.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
        for published, native in NAMES:
            if re.match(_pattern(native) + r"\.", name):
                out[re.sub(_pattern(native), _replacement(published), name, count=1)] = tensor
                break
        else:
            raise ValueError(f"{name}: no place for it in the published ChatGLM layout")
    return out


# What the published directory holds besides weights: copied as they are into an export in its layout.
PUBLISHED_FILES = ("config.json", "generation_config.json", "tokenizer.model", "ice_text.model",
                   "tokenizer_config.json", "special_tokens_map.json")  # fmt: skip


def write_original(model, layout: Layout, out: Path, dtype: torch.dtype, max_shard_size: str) -> None:
    """`model` (GlmForCausalLM) in `layout`'s published form in `out`: THUDM's weight names (safetensors,
    sharded with an index like the published checkpoints), and the source directory's config.json (dtype
    updated), tokenizer files and own *.py files, so THUDM's code, demos and converters read it as before."""
    import shutil

    from huggingface_hub import save_torch_state_dict

    weights = {k: v.to(dtype) for k, v in model.state_dict().items()}
    if layout.name != "chatglm":  # dist_glm's ChatGLM-6B already holds THUDM's names
        weights = original_state_dict(weights)
    save_torch_state_dict(weights, str(out), max_shard_size=max_shard_size)
    for name in PUBLISHED_FILES:
        if (layout.path / name).is_file():
            shutil.copyfile(layout.path / name, out / name)
    for code in layout.path.glob("*.py"):
        shutil.copyfile(code, out / code.name)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_published_adapter(tensors: dict, layout: Layout, out: Path, dtype_name: str, adapter: Path) -> torch.dtype:
    """A P-tuning v2 checkpoint as THUDM's recipes write it and THUDM's code reads it: `pytorch_model.bin` with
    the `transformer.prefix_encoder.*` tensors, and the base's config.json with `pre_seq_len` set (and
    `prefix_projection` false: the prefix is stored as it is), beside the base's tokenizer and *.py files. The
    adapter's own files come along, so dist_glm's tools take the directory as that adapter too. Staged and
    swapped in like every export. Returns the dtype written (auto: the base's)."""
    import shutil

    from dist_glm.runtime.staging import as_umask_allows, staged

    config = json.loads((layout.path / "config.json").read_text(encoding="utf-8"))
    name = config.get("torch_dtype") if dtype_name == "auto" else dtype_name
    dtype = getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else torch.float32
    (prefix,) = (t for k, t in tensors.items() if k.endswith("embedding.weight"))
    with staged(out) as tmp:
        torch.save({k: t.to(dtype).contiguous() for k, t in tensors.items()}, tmp / "pytorch_model.bin")
        for file in PUBLISHED_FILES[1:]:
            if (layout.path / file).is_file():
                shutil.copyfile(layout.path / file, tmp / file)
        for code in layout.path.glob("*.py"):
            shutil.copyfile(code, tmp / code.name)
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(adapter / file, tmp / file)
        config.update(pre_seq_len=int(prefix.shape[0]), prefix_projection=False, torch_dtype=str(dtype)[6:])
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.chmod(0o755)
        as_umask_allows(tmp)
    return dtype
