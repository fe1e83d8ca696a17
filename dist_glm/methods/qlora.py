"""QLoRA: the frozen base weights are stored 4-bit (nf4/fp4, optionally double-quantized) or 8-bit by
bitsandbytes, and LoRA adapters train on top in the compute dtype. The artifact is a PEFT adapter plus
`quantization_config.json`, the settings needed to rebuild the same quantized base for inference."""

import json
from pathlib import Path

import torch

from dist_glm.methods import lora

trainable_only = True
export_trainable_only = True
QUANTIZATION_FILE = "quantization_config.json"


def quantization_config(cfg):
    from transformers import BitsAndBytesConfig

    m = cfg.method
    compute = torch.bfloat16 if cfg.train.bf16 else torch.float32
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


def make_trainable(model, cfg):
    import warnings

    from peft import prepare_model_for_kbit_training

    # LLM.int8 says this on every forward of every layer; the cast is how 8-bit matmul works.
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")

    # Casts the few unquantized weights (norms, embeddings, LM head) to fp32 for stable updates of
    # what flows through them; gradient checkpointing is enabled by the caller, after make_trainable.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    disable_cpu_repack(model)
    return lora.make_trainable(model, cfg)


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
