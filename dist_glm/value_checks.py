"""The training Config's value checks (no file system): `check_values` and one function per option group
(scheduler arguments, dataset mixing, evaluation, distillation, preference), kept apart from config.py so
that the typed sections stay readable. Every problem names the key and the fix."""

import json

LOWER_IS_BETTER = ("loss", "perplexity")  # metric_for_best_model's values that are not generation metrics
TRACKERS, LOCAL_ONLY = ("wandb", "swanlab"), ("tensorboard", "none")  # report_to's names


def mix_probabilities(spec: str) -> list[float]:
    probs = [float(p) for p in spec.split(",")]  # float("") raises: "0.5,,0.5" drops no entry silently
    if not all(abs(p) < float("inf") for p in probs):  # nan or inf
        raise ValueError(spec)
    return probs


def check_mix_probs(d) -> list[str]:
    if not d.mix_probs:
        return []
    try:
        probs = mix_probabilities(d.mix_probs)
    except ValueError:
        return [f"mix_probs='{d.mix_probs}' must be comma-separated finite numbers, one per dataset file, e.g. 0.8,0.2"]
    files = [f for f in d.dataset.split(",") if f.strip()]
    if len(probs) != len(files):
        return [f"mix_probs has {len(probs)} values for {len(files)} dataset files; give one per file, in order"]
    if any(p < 0 for p in probs) or abs(sum(probs) - 1) > 1e-6:
        return [f"mix_probs={d.mix_probs} must be non-negative and sum to 1 (it sums to {sum(probs):g})"]
    return []


def report_to_names(report_to: str) -> list[str]:
    """report_to's names, lower-cased, once each, in order (a YAML list arrives comma-joined)."""
    return list(dict.fromkeys(n.strip().lower() for n in report_to.split(",") if n.strip()))


def check_scheduler_kwargs(t) -> list[str]:
    """What each schedule takes (get_scheduler would raise deep inside training otherwise)."""
    takes = {"cosine_with_restarts": {"num_cycles"}, "cosine_with_min_lr": {"min_lr", "min_lr_rate", "num_cycles"}}
    try:
        kwargs = json.loads(t.lr_scheduler_kwargs or "{}")
    except ValueError:
        kwargs = None
    allowed = takes.get(t.lr_scheduler_type, set())
    numbers = isinstance(kwargs, dict) and all(type(v) in (int, float) and v >= 0 for v in kwargs.values())
    if not numbers or set(kwargs) - allowed:
        return [f"lr_scheduler_kwargs={t.lr_scheduler_kwargs}: {t.lr_scheduler_type} takes {sorted(allowed) or 'none'}"]
    if t.lr_scheduler_type == "cosine_with_min_lr" and not {"min_lr", "min_lr_rate"} & set(kwargs):
        return ['lr_scheduler_type=cosine_with_min_lr needs lr_scheduler_kwargs {"min_lr_rate": 0.1} (or min_lr)']
    return []


def check_evaluation(t, has_eval: bool) -> list[str]:
    """What needs an eval set (eval_dataset or val_size), and what needs generation."""
    out = []
    if t.early_stopping_patience and not has_eval:
        out.append(
            "early_stopping_patience needs eval_dataset (or val_size); set one or remove early_stopping_patience"
        )
    if t.eval_steps and not has_eval:
        out.append("eval_steps needs eval_dataset (or val_size); set one")
    if t.metric_for_best_model not in LOWER_IS_BETTER and not t.predict_with_generate:
        out.append(
            f"metric_for_best_model={t.metric_for_best_model!r} is a generation metric; set predict_with_generate=true"
        )
    if t.predict_with_generate and not has_eval:
        out.append("predict_with_generate needs eval_dataset (or val_size)")
    return out


def check_distill(d) -> list[str]:
    out = []
    if not d.enabled:
        if d.teacher_adapter_name_or_path:
            out.append("teacher_adapter_name_or_path needs teacher_model_name_or_path (the teacher's base); set it")
        return out
    if d.distill_top_k < 1:
        out.append(f"distill_top_k={d.distill_top_k} must be at least 1 (e.g. 64)")
    if not 0 <= d.distill_alpha <= 1:
        out.append(f"distill_alpha={d.distill_alpha} must be in [0, 1] (1 = KD only, 0 = cross-entropy only)")
    if not d.distill_temperature > 0:
        out.append(f"distill_temperature={d.distill_temperature} must be positive, e.g. 1 or 2")
    if d.distill_loss == "jsd" and not 0 < d.distill_jsd_beta < 1:
        out.append(
            f"distill_jsd_beta={d.distill_jsd_beta} must be in (0, 1); beta 0 and 1 are "
            "distill_loss=forward_kl and reverse_kl"
        )
    return out


def check_preference(cfg) -> list[str]:
    """stage=dpo/kto: its own settings, and what it does not combine with yet (each with the way out)."""
    p, d, t = cfg.preference, cfg.data, cfg.train
    if not p.enabled:
        return []
    stage = f"stage={p.stage}"
    out = [] if p.pref_beta > 0 else [f"pref_beta={p.pref_beta} must be positive, e.g. 0.1"]
    out += [] if p.pref_ftx >= 0 else [f"pref_ftx={p.pref_ftx} must be 0 (off) or positive"]
    for key in ("kto_chosen_weight", "kto_rejected_weight"):
        out += [] if getattr(p, key) > 0 else [f"{key}={getattr(p, key)} must be positive, e.g. 1"]
    for key in ("ref_model", "ref_logps_cache"):
        if getattr(p, key) and not p.needs_reference:
            out.append(f"{key} with pref_loss={p.pref_loss}: it needs no reference model; remove {key}")
    if p.pref_ftx and p.stage == "dpo" and p.pref_loss == "orpo":
        out.append("pref_ftx with pref_loss=orpo: ORPO's loss already holds the chosen answer's NLL; remove pref_ftx")
    # The reference must be where the policy starts: the model as loaded, before this run's changes to it.
    if p.needs_reference and not p.ref_model:
        m = cfg.model
        if m.adapter_name_or_path and not m.merge_adapter:
            out.append(
                f"adapter_name_or_path with {stage}: the reference would be the base without that adapter, not "
                "the model you start from; set merge_adapter=true (the adapter merged, a new one trained on it)"
            )
        if t.init_from_checkpoint:
            out.append(f"init_from_checkpoint with {stage}: the reference would not be the weights you start from; "
                       "export the checkpoint and give it as model_name_or_path")  # fmt: skip
    if t.neftune_noise_alpha:
        out.append(f"neftune_noise_alpha with {stage}: the policy would see noised embeddings and the reference "
                   "not; remove it")  # fmt: skip
    not_yet = {
        "teacher_model_name_or_path / distill_cache": cfg.distill.enabled,
        "packing": bool(d.packing),
        "mix_probs": bool(d.mix_probs),
        "predict_with_generate": t.predict_with_generate,
        "dataset_format=text": d.dataset_format == "text",
    }
    for key, given in not_yet.items():
        if given:
            out.append(f"{key}: not available with {stage} yet; remove it (or train stage=sft)")
    return out


def check_values(cfg) -> list[str]:
    """Checks on values alone (no file system); every problem names the key and the fix."""
    m, d, t, me = cfg.model, cfg.data, cfg.train, cfg.method
    has_eval = bool(d.eval_dataset or d.val_size)
    out = []

    def need(ok: bool, msg: str):
        if not ok:
            out.append(msg)

    need(bool(m.model_name_or_path), "model_name_or_path is required; set it to a local GLM checkpoint directory")
    need(bool(d.dataset), "dataset is required; set it to one or more comma-separated jsonl/json files")
    need(bool(t.output_dir), "output_dir is required; set it to a directory for checkpoints and the final model")
    positive = "per_device_train_batch_size per_device_eval_batch_size gradient_accumulation_steps logging_steps"
    for key in (positive + " generation_max_new_tokens preflight_timeout ddp_timeout").split():
        need(getattr(t, key) >= 1, f"{key}={getattr(t, key)} must be at least 1")
    for key in ("save_steps", "save_total_limit", "eval_steps", "early_stopping_patience", "warmup_steps"):
        need(getattr(t, key) >= 0, f"{key}={getattr(t, key)} must be 0 or more")
    need(t.learning_rate > 0, f"learning_rate={t.learning_rate} must be positive")
    need(0 <= t.warmup_ratio < 1, f"warmup_ratio={t.warmup_ratio} must be in [0, 1)")
    out += check_scheduler_kwargs(t)
    need(t.max_steps == -1 or t.max_steps >= 1, f"max_steps={t.max_steps} must be -1 (use epochs) or at least 1")
    need(t.max_steps >= 1 or t.num_train_epochs > 0, "num_train_epochs must be positive when max_steps is -1")
    need(t.max_nonfinite_steps >= 0, f"max_nonfinite_steps={t.max_nonfinite_steps} must be 0 (no limit) or more")
    need(
        t.loss_spike_factor == 0 or t.loss_spike_factor > 1,
        f"loss_spike_factor={t.loss_spike_factor} must be 0 (off) or above 1, e.g. 3",
    )
    need(not (t.bf16 and t.fp16), "bf16 and fp16 are both set; choose one (bf16 where the GPU has it, else fp16)")
    need(t.fp16_loss_scale_window >= 1, f"fp16_loss_scale_window={t.fp16_loss_scale_window} must be at least 1")
    need(t.fp16_hysteresis >= 1, f"fp16_hysteresis={t.fp16_hysteresis} must be at least 1")
    need(t.fp16_min_loss_scale > 0, f"fp16_min_loss_scale={t.fp16_min_loss_scale} must be positive")
    need(t.neftune_noise_alpha >= 0, f"neftune_noise_alpha={t.neftune_noise_alpha} must be 0 (off) or positive, e.g. 5")
    need(t.router_bias_update_rate >= 0, f"router_bias_update_rate={t.router_bias_update_rate} must be 0 (off) or more")
    need(t.max_grad_norm >= 0, f"max_grad_norm={t.max_grad_norm} must be 0 (off) or positive")
    need(d.cutoff_len >= 8, f"cutoff_len={d.cutoff_len} is too small; use at least 8 tokens")
    need(d.preprocessing_num_workers >= 1, f"preprocessing_num_workers={d.preprocessing_num_workers} must be >= 1")
    need(d.max_samples >= 0, f"max_samples={d.max_samples} must be 0 (all) or positive")
    need(
        d.val_size == 0 or (0 < d.val_size < 1) or (d.val_size >= 1 and d.val_size.is_integer()),
        f"val_size={d.val_size} must be a fraction in (0, 1) or a whole number of samples",
    )
    need(
        not (d.val_size and d.eval_dataset),
        "val_size and eval_dataset are both set; hold out part of dataset (val_size) or use eval_dataset, not both",
    )
    need(not (m.merge_adapter and not m.adapter_name_or_path), "merge_adapter=true needs adapter_name_or_path")
    need(
        not (t.init_optimizer_state and not t.init_from_checkpoint),
        "init_optimizer_state=true needs init_from_checkpoint (the checkpoint whose moments to take); set it",
    )
    need(
        not (t.init_from_checkpoint and m.adapter_name_or_path),
        "init_from_checkpoint and adapter_name_or_path both give the starting weights; set one",
    )
    out += check_mix_probs(d)
    unknown = [n for n in report_to_names(t.report_to) if n not in TRACKERS + LOCAL_ONLY]
    need(
        not unknown,
        f"report_to={t.report_to}: {', '.join(unknown)} is not supported; use wandb and/or swanlab (comma-separated), "
        "or tensorboard / none for local files only (output_dir/runs and metrics.jsonl are always written)",
    )
    need(me.lora_rank >= 1, f"lora_rank={me.lora_rank} must be at least 1")
    need(0 <= me.lora_dropout < 1, f"lora_dropout={me.lora_dropout} must be in [0, 1)")
    need(me.pre_seq_len >= 1, f"pre_seq_len={me.pre_seq_len} must be at least 1")
    need(me.prefix_hidden_size >= 1, f"prefix_hidden_size={me.prefix_hidden_size} must be at least 1")
    return out + check_evaluation(t, has_eval) + check_distill(cfg.distill) + check_preference(cfg)
