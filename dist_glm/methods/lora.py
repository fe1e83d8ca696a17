"""LoRA: frozen base weights plus trained low-rank adapters; the artifact is a PEFT adapter."""

from dist_glm.errors import UserError

trainable_only = True  # in checkpoints
export_trainable_only = True  # the adapter (and modules_to_save) only


def make_trainable(model, cfg):
    from peft import LoraConfig, get_peft_model

    m = cfg.method
    target = m.lora_target if m.lora_target == "all-linear" else [t.strip() for t in m.lora_target.split(",")]
    extra = [s.strip() for s in m.lora_modules_to_save.split(",") if s.strip()] or None
    lora_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=m.lora_rank,
        lora_alpha=m.lora_alpha,
        lora_dropout=m.lora_dropout,
        target_modules=target,
        use_rslora=m.use_rslora,  # scale alpha / sqrt(r) instead of alpha / r
        use_dora=m.use_dora,  # weight-decomposed LoRA
        modules_to_save=extra,  # trained in full next to the adapter, e.g. embed_tokens, lm_head
    )
    try:
        return get_peft_model(model, lora_config)
    except ValueError as e:  # PEFT names the target modules it could not find
        raise UserError(f"lora_target/lora_modules_to_save: {str(e).splitlines()[0]}") from None


def save_artifact(model, state_dict: dict, tokenizer, out_dir) -> None:
    """Rank 0 only. `state_dict` holds the gathered adapter weights under their PeftModel names, so
    PEFT never reads the (possibly ZeRO-3 partitioned, shape-[0]) live parameters."""
    model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def quantization_config(cfg):
    return None  # the base model loads in the training dtype
