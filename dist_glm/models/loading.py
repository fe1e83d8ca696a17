"""Loading GLM checkpoints and tokenizers; GLM-specific quirks are kept here.

Supported by path: GLM-4 (`GlmForCausalLM`, e.g. glm-4-9b-chat-hf), GLM-4-0414 (`Glm4ForCausalLM`) and the
MoE GLMs natively; ChatGLM2-6B, ChatGLM3-6B and glm-4-9b-chat in THUDM's published layouts translated on load
(models/chatglm.py, their own code is never run); other remote-code layouts through `trust_remote_code`.
Nothing is downloaded: a checkpoint is a local directory. Every command reads a model's config, tokenizer
and weights through load_config, load_tokenizer and from_pretrained here.
"""

from pathlib import Path

import torch

from dist_glm.errors import UserError
from dist_glm.models import chatglm, moe

# Keeps the HfDeepSpeedConfig alive while the model loads (ZeRO-3 partitions weights during
# from_pretrained only while such an object exists).
_hf_ds_config = None

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_model_path(path: str, from_scratch: bool) -> list[str]:
    p = Path(path)
    if not (p / "config.json").is_file():
        return [
            f"model_name_or_path='{path}': no config.json there; point it at a local checkpoint directory "
            "(download one first, e.g. `hf download THUDM/glm-4-9b-chat-hf --local-dir DIR`)"
        ]
    if not from_scratch and not any((p / f).is_file() for f in WEIGHT_FILES):
        return [
            f"model_name_or_path='{path}': no weights (model.safetensors or pytorch_model.bin) found; use a "
            "complete checkpoint, or set train_from_scratch=true to start from random weights"
        ]
    return []


def check_remote_code(path: str, trust_remote_code: bool) -> None:
    """ChatGLM2/3 (and glm-4-9b-chat without -hf) checkpoints ship their own Python (`auto_map` in
    config.json / tokenizer_config.json). Running it is off by default; say so before transformers
    fails with a less direct message."""
    import json

    if trust_remote_code:
        return
    layout = chatglm.detect(path)
    if layout is not None:
        chatglm.check_supported(layout)  # a known layout loads without its code, or says why not
        return
    for name in ("config.json", "tokenizer_config.json"):
        f = Path(path) / name
        if f.is_file() and json.loads(f.read_text(encoding="utf-8")).get("auto_map"):
            raise UserError(
                f"model_name_or_path='{path}': this checkpoint needs its own code ({name} has an auto_map, as "
                "remote-code layouts do), and trust_remote_code is off by default; set "
                "trust_remote_code=true if you trust the code in that directory, or use a native checkpoint "
                "(e.g. glm-4-9b-chat-hf)"
            )


def load_config(path, trust_remote_code: bool = False):
    """The model config of a checkpoint directory; a published ChatGLM layout's as GlmConfig."""
    from transformers import AutoConfig

    layout = chatglm.detect(path)
    if layout is not None:
        return chatglm.model_config(layout)
    check_remote_code(str(path), trust_remote_code)
    register_own_classes()
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def register_own_classes() -> None:
    """What dist_glm saved of its own model classes (ChatGLM-6B, model_type chatglm6b_dist_glm) loads through
    transformers' Auto classes."""
    from dist_glm.models.chatglm6b import register_auto_classes

    register_auto_classes()


def from_pretrained(path, config=None, trust_remote_code: bool = False, **kwargs):
    """AutoModelForCausalLM.from_pretrained; a published ChatGLM layout through models/chatglm.py (nothing
    converted is written anywhere)."""
    from transformers import AutoModelForCausalLM

    layout = chatglm.detect(path)
    if layout is not None:
        return chatglm.from_pretrained(layout, config, **kwargs)
    register_own_classes()
    return AutoModelForCausalLM.from_pretrained(path, config=config, trust_remote_code=trust_remote_code, **kwargs)


def describe_layout(path) -> str | None:
    """The start-up line for a translated layout, None for native checkpoints."""
    layout = chatglm.detect(path)
    return chatglm.describe(layout) if layout is not None else None


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    layout = chatglm.detect(path)
    if layout is not None:
        from dist_glm.models.chatglm_tokenizer import build_tokenizer

        return build_tokenizer(layout)
    check_remote_code(path, trust_remote_code)
    register_own_classes()  # AutoTokenizer reads config.json's model_type too
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        # GLM tokenizers pad with <|endoftext|>; fall back to EOS for any that lack a pad token.
        tok.pad_token = tok.eos_token
    return tok


def generation_eos_ids(model_or_path, tokenizer) -> list[int]:
    """GLM-4 chat ends a reply with any of <|endoftext|>, <|user|>, <|observation|>; the list comes
    from the generation config so it is right for every checkpoint, not hard-coded ids."""
    from transformers import GenerationConfig

    eos = None
    if isinstance(model_or_path, (str, Path)):
        try:
            eos = GenerationConfig.from_pretrained(model_or_path).eos_token_id
        except OSError:
            eos = None
    elif getattr(model_or_path, "generation_config", None) is not None:
        eos = model_or_path.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


def load_model(model_cfg, ds_config: dict, dtype: torch.dtype, seed: int, quantization_config=None):
    """Load (or randomly initialise) the causal LM for training.

    Under ZeRO-3 a pretrained checkpoint is loaded while an HfDeepSpeedConfig is alive, so each rank
    only ever holds its own partition. A from-scratch model is built normally on every rank from the
    same seed (identical on all ranks) and partitioned by deepspeed.initialize; building a GLM inside
    zero.Init crashes in transformers' _init_weights, so it is not attempted.
    """
    global _hf_ds_config
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from dist_glm.runtime.deepspeed_config import zero_stage
    from dist_glm.runtime.environment import local_device

    path = model_cfg.model_name_or_path
    config = load_config(path, model_cfg.trust_remote_code)
    config.use_cache = False  # the KV cache is useless in training and breaks gradient checkpointing
    moe.configure(config, model_cfg)
    # sdpa is transformers' own choice for GLM; asked for explicitly only when it is another one (remote
    # code may not take the argument at all).
    attn = getattr(model_cfg, "attn_implementation", "sdpa")
    extra = {} if attn == "sdpa" else {"attn_implementation": attn}
    # What an adapter's adapter_config.json records as its base (PEFT reads it from here): the absolute
    # path, so that the adapter finds its base from any working directory.
    config._name_or_path = str(Path(path).resolve())
    if model_cfg.train_from_scratch:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code, **extra)
        return model.to(dtype)
    if zero_stage(ds_config) == 3:
        _hf_ds_config = HfDeepSpeedConfig(ds_config)
    if quantization_config is not None:
        # bitsandbytes quantizes while the weights move to the device, so each rank loads onto its own.
        extra["quantization_config"] = quantization_config
        if zero_stage(ds_config) != 3:  # ZeRO-3 places (and partitions) the weights itself
            extra["device_map"] = {"": local_device()}
    try:
        trust = model_cfg.trust_remote_code
        model = from_pretrained(path, config=config, dtype=dtype, trust_remote_code=trust, **extra)
        model.config._name_or_path = config._name_or_path  # from_pretrained set the path as given
        return model
    except (OSError, ValueError) as e:
        raise UserError(f"model_name_or_path='{path}': could not load weights ({str(e).splitlines()[0]})") from None
    except RuntimeError as e:
        raise weights_do_not_fit(path, e) from None


def weights_do_not_fit(path, error: RuntimeError) -> Exception:
    """A one-line UserError for a model directory whose config.json disagrees with its weights (transformers
    raises "You set `ignore_mismatched_sizes` to `False`" and prints the details as a report); any other
    RuntimeError is returned unchanged, to be raised as the bug it is."""
    if "ignore_mismatched_sizes" not in str(error) and "size mismatch" not in str(error):
        return error
    detail = first_shape_mismatch(Path(path)) or str(error).splitlines()[0]
    return UserError(
        f"model_name_or_path='{path}': its config.json does not fit its weights ({detail}); use the config.json "
        "that was saved with these weights"
    )


def first_shape_mismatch(path: Path) -> str | None:
    """The first tensor whose shape in the safetensors files differs from the model config.json builds
    (built on the meta device: nothing is allocated)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    files = sorted(path.glob("*.safetensors"))
    if not files or chatglm.detect(path) is not None:  # other names on disk than in the model
        return None
    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(load_config(path))
    expected = {name: tuple(t.shape) for name, t in built.state_dict().items()}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                saved = tuple(f.get_slice(name).get_shape())
                if name in expected and expected[name] != saved:
                    return f"{name} is {list(saved)} in {file.name} but {list(expected[name])} by config.json"
    return None


def check_attention(model_cfg) -> list[str]:
    """Before launch: the attention kernel asked for can run here."""
    import importlib.util

    if getattr(model_cfg, "attn_implementation", "sdpa") != "flash_attention_2":
        return []
    if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
        missing = "the flash-attn package" if importlib.util.find_spec("flash_attn") is None else "a CUDA GPU"
        return [
            f"attn_implementation=flash_attention_2 needs {missing} (pip install flash-attn on a CUDA machine); "
            "use attn_implementation=sdpa, which needs nothing extra"
        ]
    return []


# Liger-Kernel's GLM patch covers GLM-4-0414 (model_type glm4): RMSNorm and the fused gate/up SwiGLU MLP.
LIGER_MODEL_TYPES = ("glm4",)


def check_liger(model_cfg) -> list[str]:
    """Before launch: use_liger_kernel can run here (Triton kernels: a CUDA GPU, the package, a model it patches)."""
    import importlib.util
    import json

    if not getattr(model_cfg, "use_liger_kernel", False):
        return []
    config_file = Path(model_cfg.model_name_or_path) / "config.json"
    model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
    if importlib.util.find_spec("liger_kernel") is None:
        return ["use_liger_kernel needs the liger-kernel package (pip install liger-kernel on a CUDA machine)"]
    if not torch.cuda.is_available():
        return ["use_liger_kernel needs a CUDA GPU (Liger's kernels are Triton); drop it on this machine"]
    if model_type not in LIGER_MODEL_TYPES:
        return [
            f"use_liger_kernel: Liger patches GLM-4-0414 models (model_type glm4), not model_type {model_type}; "
            "drop use_liger_kernel"
        ]
    return []


def apply_liger(model) -> None:
    """Liger's RMSNorm and SwiGLU kernels on this model instance. Not its fused linear cross-entropy:
    dist_glm's loss already runs the LM head on labelled positions only, in chunks
    (dist_glm.objectives.cross_entropy), and
    does not go through the model's forward for logits."""
    from liger_kernel.transformers import apply_liger_kernel_to_glm4

    apply_liger_kernel_to_glm4(rope=False, cross_entropy=False, fused_linear_cross_entropy=False, model=model)


def add_neftune(model, alpha: float) -> None:
    """NEFTune (Jain et al. 2023): while training, uniform noise in [-a, a] with a = alpha / sqrt(L * d)
    (L tokens, d the hidden size) on the input embeddings; evaluation and generation see none."""
    import math

    def noisy(module, inputs, output):
        if not module.training:
            return output
        scale = alpha / math.sqrt(output.size(1) * output.size(2))
        return output + torch.empty_like(output).uniform_(-scale, scale)

    model.get_input_embeddings().register_forward_hook(noisy)


def enable_gradient_checkpointing(model) -> None:
    # Non-reentrant checkpointing computes correct gradients even when the inputs of a checkpointed
    # block do not require grad (the frozen-embedding case of LoRA), so no input-grad hook is needed.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def leave_out_bitsandbytes(cfg, method) -> bool:
    """Marks bitsandbytes absent in this process when the run loads no quantized weights; returns whether it did.

    PEFT imports bitsandbytes whenever it is installed (peft.helpers), and bitsandbytes' import wraps its
    kernels in torch.compile, which imports torch's inductor: 2-3.5 s and ~45 MB of start-up in every LoRA
    rank that quantizes nothing (measured on CPU, docs/performance.md). A None entry in sys.modules makes
    `import bitsandbytes` raise ImportError and find_spec return None, so PEFT leaves out its quantized-layer
    support, which such a run never reaches. Kept whenever anything might load 4/8-bit weights: the method
    quantizes, an adapter is named (its base may have been trained quantized), or a checkpoint's config.json
    carries a quantization_config."""
    import json
    import sys

    if "bitsandbytes" in sys.modules or method.quantization_config(cfg) is not None:
        return False
    adapters = (cfg.model.adapter_name_or_path, cfg.distill.teacher_adapter_name_or_path)
    models = (cfg.model.model_name_or_path, cfg.distill.teacher_model_name_or_path, cfg.preference.ref_model)
    if any(adapters):
        return False
    for path in filter(None, models):
        config = Path(path) / "config.json"
        try:
            if not config.is_file() or "quantization_config" in json.loads(config.read_text(encoding="utf-8")):
                return False  # an adapter or checkpoint directory, or a quantized checkpoint
        except (OSError, ValueError):
            return False
    sys.modules["bitsandbytes"] = None
    return True
