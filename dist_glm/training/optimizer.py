"""The optimizer and learning-rate schedule, built from the training config alone (a ds config's
optimizer/scheduler sections are refused in distributed.build_ds_config, so there is one source)."""

import json
import math

import torch


def build_optimizer(model, t, offload: bool):
    """AdamW; biases and norm weights (1-D tensors) get no weight decay, as in HF and GLM's recipes."""
    return optimizer_for(model.parameters(), t, offload)


def expert_parallel_optimizer(t, offload: bool):
    """The optimizer as DeepSpeed takes it under expert parallelism: a callable, because AutoEP replaces
    the MoE blocks (and their parameters) inside deepspeed.initialize, and with the experts' parameters in
    their own groups, which ZeRO-1/2 need to reduce them over the expert-data-parallel ranks only."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return lambda params: optimizer_for(params, t, offload, split_params_into_different_moe_groups_for_optimizer)


def optimizer_for(params, t, offload: bool, regroup=None):
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            # Under ZeRO-3 a parameter's local shape is a placeholder; ds_shape is the real one.
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": t.weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if regroup is not None:
        groups = regroup(groups)
    betas = (t.adam_beta1, t.adam_beta2)
    if offload:
        # ZeRO-Offload steps the optimizer on the CPU; DeepSpeed's vectorised CPU Adam is the one it supports.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=t.learning_rate, betas=betas, eps=t.adam_epsilon, adamw_mode=True)
    # fused: one kernel over all tensors instead of torch's per-tensor Python loop, on CPU (torch >= 2.4)
    # and CUDA; on the real-vocabulary GLM's 155M embedding + head parameters it measured 8x faster on CPU,
    # where the unfused step was half of a full fine-tuning step (docs/performance.md). Same update rule.
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=betas, eps=t.adam_epsilon, fused=_fusable(groups))


def _fusable(groups) -> bool | None:
    """Whether torch's fused AdamW takes these parameters (floating point, on a device it has the kernel
    for); None leaves torch's default otherwise."""
    params = [p for g in groups for p in g["params"]]
    devices = {"cpu", "cuda", "xpu", "mps", "hpu"}
    return True if all(p.is_floating_point() and p.device.type in devices for p in params) else None


def lr_factor(kind: str, step: int, warmup: int, total: int, num_cycles: float | None, min_lr_rate: float) -> float:
    """The learning rate's multiplier at `step`: Hugging Face's schedules by their names and their definitions
    (tests/test_train_options.py checks every one against transformers' get_scheduler). A linear warmup from
    0 over `warmup` steps (not for plain `constant`, which has none there), then constant, linear to 0 at
    `total`, or cosine: half a wave to 0 (`num_cycles` 0.5), to `min_lr_rate` (cosine_with_min_lr), or
    `num_cycles` hard restarts (cosine_with_restarts, 1 by default)."""
    if kind == "constant":
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant_with_warmup":
        return 1.0
    if kind == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine_with_restarts":
        cycles = 1 if num_cycles is None else num_cycles
        return 0.0 if progress >= 1 else max(0.0, 0.5 * (1 + math.cos(math.pi * ((cycles * progress) % 1.0))))
    factor = 0.5 * (1 + math.cos(math.pi * (0.5 if num_cycles is None else num_cycles) * 2 * progress))
    return max(0.0, factor * (1 - min_lr_rate) + min_lr_rate)


def build_scheduler(optimizer, t, total_steps: int):
    """A LambdaLR over `lr_factor`, written here rather than taken from transformers.get_scheduler: importing
    transformers.optimization imports its trainer utilities, and with them PEFT and bitsandbytes (about 1.3 s
    of start-up on every run, most of the gap to HF Trainer's first step on a small model)."""
    warmup = t.warmup_steps or math.ceil(t.warmup_ratio * total_steps)
    kwargs = json.loads(t.lr_scheduler_kwargs or "{}")  # checked: only what the schedule takes
    min_lr_rate = kwargs.get("min_lr_rate", 0.0)
    if "min_lr" in kwargs:  # an absolute floor, as a share of the configured rate
        min_lr_rate = kwargs["min_lr"] / optimizer.defaults["lr"]
    kind, cycles = t.lr_scheduler_type, kwargs.get("num_cycles")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(kind, step, warmup, total_steps, cycles, min_lr_rate)
    )
