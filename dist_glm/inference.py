"""Loading a trained result for inference, whatever the method produced it: a full HF model, or a
PEFT artifact (LoRA adapter, QLoRA adapter + quantization_config.json, P-tuning v2 prefix) applied to
its base model."""

import json
from pathlib import Path

import torch

from dist_glm.errors import UserError
from dist_glm.methods.qlora import QUANTIZATION_FILE

ADAPTER_FILE = "adapter_config.json"


def load_for_inference(model_name_or_path: str, adapter_name_or_path: str = "", dtype=torch.float32):
    """`model_name_or_path` is a full model, or an adapter directory whose adapter_config.json names
    its base; `adapter_name_or_path` applies an adapter to the given base explicitly."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = Path(model_name_or_path)
    adapter = Path(adapter_name_or_path) if adapter_name_or_path else None
    if adapter is None and (path / ADAPTER_FILE).is_file():
        adapter = path
        path = Path(json.loads((path / ADAPTER_FILE).read_text())["base_model_name_or_path"] or "")
    if adapter is not None and not (adapter / ADAPTER_FILE).is_file():
        raise UserError(f"adapter_name_or_path='{adapter}': no {ADAPTER_FILE} there; point it at a training output")
    if not (path / "config.json").is_file():
        raise UserError(f"model_name_or_path='{path}': no config.json there; point it at the base model directory")
    extra = {}
    if adapter is not None and (adapter / QUANTIZATION_FILE).is_file():
        # A QLoRA adapter was trained against the quantized base: rebuild exactly that base.
        settings = json.loads((adapter / QUANTIZATION_FILE).read_text())
        extra["quantization_config"] = BitsAndBytesConfig.from_dict(settings)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra)
    model.config.use_cache = True
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()
