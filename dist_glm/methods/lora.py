"""LoRA: frozen base weights plus trained low-rank adapters; the artifact is a PEFT adapter."""

trainable_only = True


def prepare(model, cfg):
    from peft import LoraConfig, get_peft_model

    m = cfg.method
    target = m.lora_target if m.lora_target == "all-linear" else [t.strip() for t in m.lora_target.split(",")]
    lora_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=m.lora_rank,
        lora_alpha=m.lora_alpha,
        lora_dropout=m.lora_dropout,
        target_modules=target,
    )
    return get_peft_model(model, lora_config)


def save_artifact(model, state_dict: dict, tokenizer, out_dir) -> None:
    """Rank 0 only. `state_dict` holds the gathered adapter weights under their PeftModel names, so
    PEFT never reads the (possibly ZeRO-3 partitioned, shape-[0]) live parameters."""
    model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
