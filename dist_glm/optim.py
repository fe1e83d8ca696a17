"""The optimizer and learning-rate schedule, built from the training config alone (a ds config's
optimizer/scheduler sections are refused in distributed.build_ds_config, so there is one source)."""

import math

import torch


def build_optimizer(model, t, offload: bool):
    """AdamW; biases and norm weights (1-D tensors) get no weight decay, as in HF and GLM's recipes."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # Under ZeRO-3 a parameter's local shape is a placeholder; ds_shape is the real one.
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    betas = (t.adam_beta1, t.adam_beta2)
    if offload:
        # ZeRO-Offload steps the optimizer on the CPU; DeepSpeed's vectorised CPU Adam is the one it supports.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=t.learning_rate, betas=betas, eps=t.adam_epsilon, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=betas, eps=t.adam_epsilon)


def build_scheduler(optimizer, t, total_steps: int):
    from transformers import get_scheduler

    warmup = t.warmup_steps or math.ceil(t.warmup_ratio * total_steps)
    return get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
