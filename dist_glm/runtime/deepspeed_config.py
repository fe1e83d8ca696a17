"""The DeepSpeed config: the user's JSON read and checked against the training config, which owns batch
sizes, clipping, precision and the optimizer; every "auto" filled from it."""

import json
from pathlib import Path

from dist_glm.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]


DEFAULT_DS_CONFIG = REPO_ROOT / "ds_configs" / "zero0.json"


# Keys our training config owns. In a ds config they must be "auto" (or agree with ours), so that
# batch sizes, clipping and precision have one source of truth.
_OWNED_SECTIONS = ("optimizer", "scheduler")


def read_ds_config(path: str) -> dict:
    p = Path(path) if path else DEFAULT_DS_CONFIG
    if not p.is_file():
        raise UserError(f"deepspeed='{path}': file not found; use one of ds_configs/*.json or your own JSON file")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"deepspeed='{p}': not valid JSON ({e}); fix the file") from None
    if not isinstance(cfg, dict):
        raise UserError(f"deepspeed='{p}': expected a JSON object at the top level")
    return cfg


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def is_offload(ds_config: dict) -> bool:
    z = ds_config.get("zero_optimization", {})
    return z.get("offload_optimizer", {}).get("device", "none") not in ("none", None)


# DeepSpeed AutoEP has no GLM preset; GLM-4.5's and GLM-5's MoE blocks have DeepSeek-V3's structure (sigmoid
# router with e_score_correction_bias and group-limited top-k, fused 3-D experts under `mlp.experts`, one
# shared expert), and its top-k, scaling and normalisation are read from the model's config.json.
GLM_AUTOEP_PRESET = "deepseek_v3"


def expert_parallel_size(ds_config: dict) -> int:
    section = ds_config.get("expert_parallel") or {}
    return int(section.get("autoep_size", 1)) if section.get("enabled") else 1


def add_expert_parallel(ds: dict, size: int, world_size: int, where: str) -> list[str]:
    """expert_parallel_size as DeepSpeed AutoEP's section; a section already in the user's JSON is
    passed through when it agrees."""
    given = ds.get("expert_parallel")
    if given is not None and given.get("enabled") and size not in (1, given.get("autoep_size")):
        return [
            f"{where}: expert_parallel.autoep_size={given.get('autoep_size')} contradicts expert_parallel_size={size}"
        ]
    if given is None and size > 1:
        ds["expert_parallel"] = given = {"enabled": True, "autoep_size": size, "preset_model": GLM_AUTOEP_PRESET}
    ep = expert_parallel_size(ds)
    if ep < 1 or world_size % ep:
        return [f"expert_parallel_size={ep} must divide the number of ranks ({world_size})"]
    if given is not None and given.get("enabled"):
        given.setdefault("preset_model", GLM_AUTOEP_PRESET)
    return []


def build_ds_config(train_cfg, world_size: int) -> dict:
    """Read the user's ds config and fill every "auto" from the training config.

    Raises UserError when a ds config value contradicts the training config, instead of silently
    letting one of them win (DeepSpeed-Chat's classic surprise).
    """
    path = train_cfg.deepspeed
    ds = read_ds_config(path)
    where = f"deepspeed='{path or DEFAULT_DS_CONFIG}'"
    mbs, gas = train_cfg.per_device_train_batch_size, train_cfg.gradient_accumulation_steps
    ours = {
        "train_micro_batch_size_per_gpu": mbs,
        "gradient_accumulation_steps": gas,
        "train_batch_size": train_cfg.global_batch_size(world_size),
        "gradient_clipping": train_cfg.max_grad_norm,
    }
    problems = []
    for section in _OWNED_SECTIONS:
        if section in ds:
            problems.append(
                f"{where}: remove the '{section}' section; the optimizer and schedule come from "
                "learning_rate, weight_decay, lr_scheduler_type and warmup_* in the training config"
            )
    for key, value in ours.items():
        given = ds.get(key, "auto")
        if given != "auto" and given != value:
            problems.append(
                f"{where}: {key}={given} contradicts the training config ({key}={value} from "
                f"per_device_train_batch_size={mbs} x gradient_accumulation_steps={gas} x "
                f'world_size={world_size}); set it to "auto"'
            )
        ds[key] = value
    stage = zero_stage(ds)
    if stage not in (0, 1, 2, 3):
        problems.append(f"{where}: zero_optimization.stage={stage} is not one of 0, 1, 2, 3")
    for prec, want in (("bf16", train_cfg.bf16), ("fp16", train_cfg.fp16)):
        sec = ds.setdefault(prec, {})
        enabled = sec.get("enabled", "auto")
        if enabled != "auto" and bool(enabled) != want:
            problems.append(
                f'{where}: {prec}.enabled={enabled} contradicts {prec}={want} in the training config; set it to "auto"'
            )
        sec["enabled"] = want
    # Dynamic loss scaling: DeepSpeed's knobs, "auto" (or absent) = the training config's fp16_* values.
    scaling = {
        "loss_scale": 0,  # 0 = dynamic
        "initial_scale_power": train_cfg.fp16_initial_scale_power,
        "loss_scale_window": train_cfg.fp16_loss_scale_window,
        "hysteresis": train_cfg.fp16_hysteresis,
        "min_loss_scale": train_cfg.fp16_min_loss_scale,
    }
    fp16 = ds["fp16"]
    for key, value in scaling.items():
        if fp16.get(key, "auto") == "auto":
            fp16[key] = value
    if not train_cfg.fp16:
        ds["fp16"] = {"enabled": False}
    if train_cfg.fp16 and stage == 0:
        # DeepSpeed 0.19's ZeRO-0 fp16 optimizer unscales gradients in step() but engine.backward never
        # scaled the loss for it (only ZeRO optimizers are scaled), so updates come out 2**16 too small.
        problems.append(
            f"{where}: fp16 needs zero_optimization.stage 1, 2 or 3 (DeepSpeed's ZeRO-0 fp16 path does not "
            "apply its loss scale); pass --deepspeed=ds_configs/zero1.json, the same as ZeRO-0 on one GPU"
        )
    if is_offload(ds) and stage == 0:
        problems.append(f"{where}: offload_optimizer needs zero_optimization.stage 1, 2 or 3")
    problems += add_expert_parallel(ds, train_cfg.expert_parallel_size, world_size, where)
    # Per-bucket sizes left as "auto" get DeepSpeed's own defaults.
    z = ds.setdefault("zero_optimization", {"stage": 0})
    for key in [k for k, v in z.items() if v == "auto"]:
        del z[key]
    ds.setdefault("steps_per_print", 10**9)  # we log ourselves; keep DeepSpeed's step log quiet
    ds.setdefault("wall_clock_breakdown", False)
    if problems:
        raise UserError(problems)
    return ds
