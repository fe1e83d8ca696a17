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


def prepare(model, cfg):
    import warnings

    from peft import prepare_model_for_kbit_training

    # LLM.int8 says this on every forward of every layer; the cast is how 8-bit matmul works.
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")

    # Casts the few unquantized weights (norms, embeddings, LM head) to fp32 for stable updates of
    # what flows through them; gradient checkpointing is enabled by the caller, after prepare.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return lora.prepare(model, cfg)


def save_artifact(model, state_dict: dict, tokenizer, out_dir) -> None:
    lora.save_artifact(model, state_dict, tokenizer, out_dir)
    quant = model.get_base_model().config.quantization_config
    quant = quant.to_dict() if hasattr(quant, "to_dict") else dict(quant)
    (Path(out_dir) / QUANTIZATION_FILE).write_text(json.dumps(quant, indent=2, default=str) + "\n")
