"""LoRA: frozen base weights plus trained low-rank adapters; the artifact is a PEFT adapter."""

from dist_glm.errors import UserError
from dist_glm.methods import full, lora_targets

trainable_only = True  # in checkpoints
export_trainable_only = True  # the adapter (and modules_to_save) only
is_adapter = True
can_pack = True
export_refusal = None  # export.py merges it into its base
# PEFT's own shorthand, and LLaMA-Factory's spelling of it.
ALL_LINEAR = lora_targets.ALL_LINEAR
# Written beside a LoRA adapter that trained against a quantized base (dist_glm.methods.qlora).
QUANTIZED_BASE_FILE = "quantization_config.json"


def target_modules(m) -> str | list[str]:
    if m.lora_target.strip() in ALL_LINEAR:
        return "all-linear"
    return [t.strip() for t in m.lora_target.split(",") if t.strip()]


# THUDM's ChatGLM2/3 module names (their LoRA recipes' lora_target) and what they are in GlmForCausalLM.
CHATGLM_MODULES = {
    "query_key_value": "q_proj,k_proj,v_proj",
    "dense": "o_proj",
    "dense_h_to_4h": "gate_up_proj",
    "dense_4h_to_h": "down_proj",
}


def check_config(cfg) -> list[str]:
    """lora_target and lora_modules_to_save against the model's module names, from its config.json alone
    (the model is built on the meta device: no weights load), so a typo fails in a second, not after the
    weights have loaded on every rank."""
    m = cfg.method
    targets = target_modules(m)
    extra = [s.strip() for s in m.lora_modules_to_save.split(",") if s.strip()]
    if targets == "all-linear" and not extra:
        return []
    names = module_names(cfg.model)
    if names is None:
        return []  # no config.json to read; check_model_path reports that
    out = []
    # A pattern (^...$) is what dist_glm saved for an MoE adapter (lora_targets.layer_pattern), adopted when
    # the adapter is continued; PEFT matches it against the model when the adapter loads.
    named = [] if targets == "all-linear" else [t for t in targets if t not in lora_targets.KINDS + ALL_LINEAR]
    named = [t for t in named if not t.startswith("^")]
    if chatglm_names := [t for t in named if t in CHATGLM_MODULES and t not in names]:
        native = ", ".join(f"{t} -> {CHATGLM_MODULES[t]}" for t in chatglm_names)
        return [
            f"lora_target: {', '.join(chatglm_names)} is how THUDM's code names the module; "
            f"{cfg.model.model_name_or_path} loads as GlmForCausalLM, where that is {native}"
        ]
    for key, wanted in (("lora_target", named), ("lora_modules_to_save", extra)):
        unknown = [w for w in wanted if w not in names]
        if unknown:
            linear = ", ".join(sorted(names))
            out.append(
                f"{key}: {', '.join(unknown)} is not a module name in {cfg.model.model_name_or_path}; use "
                f"comma-separated names from: {linear}, or kinds ({', '.join(lora_targets.KINDS)}), or all"
            )
    return out


def module_names(model_cfg) -> set[str] | None:
    """The last component of every submodule name (q_proj, mlp, lm_head, ...), built on the meta device."""
    import json
    from pathlib import Path

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GlmConfig

    path = model_cfg.model_name_or_path
    if not (Path(path) / "config.json").is_file():
        return None
    try:
        published = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        if published.get("model_type") == "chatglm" and "position_encoding_2d" in published:
            return None  # ChatGLM-6B: dist_glm's own class (THUDM's module names), checked when it loads
        if published.get("model_type") == "chatglm":
            # A published ChatGLM2/3 / glm-4-9b-chat layout loads as GlmForCausalLM (models/chatglm.py): its module
            # names are GLM's, whatever the sizes.
            config = GlmConfig(num_hidden_layers=1)
        else:
            config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError):
        return None  # a config it cannot build (remote code not trusted, say): reported when it loads
    last = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
    return {n for n in last if not n.isdigit()}  # layer indices are not module names


def make_trainable(model, cfg):
    from peft import LoraConfig, get_peft_model

    m = cfg.method
    extra = [s.strip() for s in m.lora_modules_to_save.split(",") if s.strip()]
    # By kind on MoE models (and wherever a kind is named); PEFT's own all-linear on dense ones.
    resolved = lora_targets.peft_targets(model, m.lora_target)
    targets = {"target_modules": target_modules(m)} if resolved is None else dict(resolved)
    extra += targets.pop("modules_to_save", [])
    if not targets.get("target_modules") and not targets.get("target_parameters"):
        has = ", ".join(k for k, names in lora_targets.classify(model).items() if names)
        raise UserError(f"lora_target={m.lora_target}: this model has nothing of that kind; it has: {has}")
    lora_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=m.lora_rank,
        lora_alpha=m.lora_alpha,
        lora_dropout=m.lora_dropout,
        **targets,
        use_rslora=m.use_rslora,  # scale alpha / sqrt(r) instead of alpha / r
        use_dora=m.use_dora,  # weight-decomposed LoRA
        modules_to_save=extra or None,  # trained in full next to the adapter, e.g. embed_tokens, lm_head
    )
    try:
        with lora_targets.native_targets(model):
            return get_peft_model(model, lora_config)
    except ValueError as e:  # PEFT names the target modules it could not find
        raise UserError(f"lora_target/lora_modules_to_save: {str(e).splitlines()[0]}") from None


def save_artifact(model, state_dict: dict, tokenizer, out_dir) -> None:
    """Rank 0 only. `state_dict` holds the gathered adapter weights under their PeftModel names, so
    PEFT never reads the (possibly ZeRO-3 partitioned, shape-[0]) live parameters."""
    model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


quantization_config = full.quantization_config
inference_quantization = full.inference_quantization
after_load = full.after_load
published_tensors = full.published_tensors


def owns_adapter(adapter_dir, adapter_config: dict) -> bool:
    from pathlib import Path

    # A QLoRA adapter is a LoRA adapter plus the record of its quantized base: that one is qlora's.
    quantized = (Path(adapter_dir) / QUANTIZED_BASE_FILE).is_file()
    return adapter_config.get("peft_type") == "LORA" and not quantized


def adapter_settings(adapter_dir) -> dict:
    """PEFT's adapter_config.json in MethodConfig's terms (targets as PEFT resolved them)."""
    import json
    from pathlib import Path

    c = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    targets = c.get("target_modules") or []
    return {
        "lora_rank": int(c["r"]),
        "lora_alpha": float(c["lora_alpha"]),
        "lora_dropout": float(c.get("lora_dropout") or 0.0),
        "lora_target": ",".join(sorted(targets)) if isinstance(targets, list) else str(targets),
        "use_rslora": bool(c.get("use_rslora")),
        "use_dora": bool(c.get("use_dora")),
        "lora_modules_to_save": ",".join(c.get("modules_to_save") or []),
    }


def continue_adapter(model, adapter_dir, cfg):
    from peft import PeftModel

    with lora_targets.native_targets(model):
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
