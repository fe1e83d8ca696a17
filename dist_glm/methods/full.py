"""Full-parameter fine-tuning: every weight trains; the artifact is a complete HF model."""

trainable_only = False  # checkpoints hold every weight
export_trainable_only = False
is_adapter = False  # the artifact is a standalone model, not something applied to a base
can_pack = True  # packed rows train like any others
export_refusal = None  # export.py consolidates it into a plain HF model


def check_config(cfg) -> list[str]:
    return []


def make_trainable(model, cfg):
    model.requires_grad_(True)
    return model


def save_artifact(model, state_dict: dict, tokenizer, out_dir) -> None:
    """Rank 0 only. `state_dict` is the gathered full model (never ZeRO-3 placeholders)."""
    model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def quantization_config(cfg):
    return None  # the base model loads in the training dtype


def owns_adapter(adapter_dir, adapter_config: dict) -> bool:
    return False


def inference_quantization(adapter_dir):
    return None


def after_load(model) -> None:
    """Nothing to adjust on a loaded model."""


def published_tensors(adapter_dir) -> None:
    return None  # the model itself is what gets written


def adapter_settings(adapter_dir) -> dict:
    return {}  # a whole model is continued as model_name_or_path, never as an adapter


def continue_adapter(model, adapter_dir, cfg):
    raise AssertionError("dist_glm.training.continued refuses adapter_name_or_path for methods without an adapter")
