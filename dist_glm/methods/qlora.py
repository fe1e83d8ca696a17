"""QLoRA: the frozen base weights are stored 4-bit (nf4/fp4, optionally double-quantized) or 8-bit by
bitsandbytes, and LoRA adapters train on top in the compute dtype. The artifact is a PEFT adapter plus
`quantization_config.json`, the settings needed to rebuild the same quantized base for inference."""

import json
from pathlib import Path

from dist_glm.methods import lora

trainable_only = True
export_trainable_only = True
is_adapter = True
can_pack = True
export_refusal = None  # export.py merges it into the de-quantized base
QUANTIZATION_FILE = lora.QUANTIZED_BASE_FILE


def check_config(cfg) -> list[str]:
    out = []
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        out.append("finetuning_type=qlora needs bitsandbytes; `pip install bitsandbytes`, or use lora")
    if cfg.model.train_from_scratch:
        out.append(
            "finetuning_type=qlora quantizes pretrained weights and train_from_scratch=true has none; "
            "use finetuning_type=lora (or full) for a model trained from scratch"
        )
    return out + lora.check_config(cfg)


def owns_adapter(adapter_dir, adapter_config: dict) -> bool:
    """A LoRA adapter that trained against a quantized base (it records how)."""
    return adapter_config.get("peft_type") == "LORA" and (Path(adapter_dir) / QUANTIZATION_FILE).is_file()


def inference_quantization(adapter_dir):
    """The adapter trained against the quantized base: rebuild exactly that base."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig.from_dict(json.loads((Path(adapter_dir) / QUANTIZATION_FILE).read_text()))


def after_load(model) -> None:
    import logging

    # LLM.int8 logs "inputs will be cast to float16" on every forward of every layer; that cast is how
    # its 8-bit matmul works, not a problem to report.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    disable_cpu_repack(model)


def quantization_config(cfg):
    from transformers import BitsAndBytesConfig

    m = cfg.method
    compute = cfg.train.dtype  # the 4-bit matmuls compute in the training precision
    if m.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=m.quantization_type,
        bnb_4bit_use_double_quant=m.double_quantization,
        bnb_4bit_compute_dtype=compute,
        # Packed 4-bit values stored in the compute dtype's tensors, so that ZeRO-3 can flatten and
        # partition them alongside ordinary weights.
        bnb_4bit_quant_storage=compute,
    )


def make_trainable(model, cfg, attach=lora.make_trainable):
    """LoRA on the quantized base; a base that was de-quantized (export's merge) is plain LoRA. `attach`
    puts the adapter on (a new one, or a saved one to continue)."""
    if not getattr(model, "is_quantized", False):
        return attach(model, cfg)
    import warnings

    from peft import prepare_model_for_kbit_training

    # LLM.int8 says this on every forward of every layer; the cast is how 8-bit matmul works.
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")

    # Casts the few unquantized weights (norms, embeddings, LM head) to fp32 for stable updates of
    # what flows through them; gradient checkpointing is enabled by the caller, after make_trainable.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    disable_cpu_repack(model)
    return attach(model, cfg)


adapter_settings = lora.adapter_settings
published_tensors = lora.published_tensors


def continue_adapter(model, adapter_dir, cfg):
    """The saved adapter on the base re-quantized exactly as it trained (its quantization_config.json)."""
    return make_trainable(model, cfg, attach=lambda m, _: lora.continue_adapter(m, adapter_dir, cfg))


def disable_cpu_repack(model) -> None:
    """bitsandbytes (0.48 and later) on a CPU with AVX512-BF16 repacks a 4-bit weight in place, into a
    bf16 inference layout, the first time the layer runs in eval mode without gradients. We keep the
    layout that trained: the repack rewrites `weight.data` behind ZeRO's back (the train step after a
    mid-run eval would see the new layout), asserts shapes small models break (output rows in blocks of
    32, input columns in whole quantization blocks), and computes in bf16, so evaluation, export and the
    tools would no longer agree with the trained model to fp32 precision (measured: 1e-2 on the logits).
    The cost is CPU inference speed only; GPUs never take this path."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def save_artifact(model, state_dict: dict, tokenizer, out_dir) -> None:
    lora.save_artifact(model, state_dict, tokenizer, out_dir)
    quant = model.get_base_model().config.quantization_config
    quant = quant.to_dict() if hasattr(quant, "to_dict") else dict(quant)
    (Path(out_dir) / QUANTIZATION_FILE).write_text(json.dumps(quant, indent=2, default=str) + "\n")
