"""One optimizer step: the micro-batches' forward and backward, the loss normalised by the global
trainable-token count, clipping, and the decisions that keep a bad step away from the weights (the
guard's skips, fp16's overflows). The loop in dist_glm.training.loop calls `train_step` once per step."""

import math
from dataclasses import dataclass

import torch

from dist_glm.runtime import collectives


@dataclass
class StepResult:
    loss: float  # over the global batch
    grad_norm: float  # global, before clipping
    nonpad_tokens: int  # over the global batch
    skipped: str | None  # why the update was not applied (dist_glm.training.guard), or None
    parts: dict[str, float]  # the objective's named parts (distillation's ce_loss, kd_loss), per token
    overflow: bool = False  # fp16: the loss scaler skipped this update (gradients overflowed)


def train_step(
    engine, micro_batches: list[dict], world_size: int, device, clip: float | None, guard, objective, routing=None
) -> StepResult:
    """One optimizer step over this rank's micro-batches. `clip` is set when this loop clips instead of
    the engine (`takes_over_clipping`): the max norm, 0 for no clipping but a measured norm. `objective`
    gives the loss as a sum over labelled tokens (an `Objective`, dist_glm.objectives)."""
    # Collective: the loss is normalised by the trainable-token count of the *global* batch (the objective's
    # count: pairs for a preference loss), so every rank needs it before its first backward. Counted on the
    # host, before the batches move.
    local_tokens = sum(objective.count(b) for b in micro_batches)
    local_nonpad = sum(int(b["token_mask"].sum()) for b in micro_batches)
    global_tokens = max(float(collectives.all_reduce_sum([local_tokens])[0]), 1.0)
    # engine.backward divides by the accumulation steps and the gradient all-reduce averages over
    # ranks; multiplying by both turns the result into sum(token losses) / global_tokens exactly.
    scale = world_size * len(micro_batches) / global_tokens
    objective.prepare(engine, micro_batches, device)  # collective: what the loss needs from the global batch
    local_loss_sum, own_norm, skipped = torch.zeros((), device=device), None, None
    local_parts = torch.zeros(len(objective.parts), device=device)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        if routing:  # an MoE model counts tokens per expert in this forward (not in recomputes, not in eval)
            routing.set_batch(batch["token_mask"])
        loss_sum, parts = objective.loss_sums(engine, batch)
        if routing:
            routing.set_batch(None)
        local_loss_sum += loss_sum.detach()  # stays on the device: one transfer per step, below
        if parts:
            local_parts += torch.stack([parts[name].detach() for name in objective.parts])
        if last:
            # Collective: the step's global loss, before the last backward, so that a step the guard
            # refuses is refused on every rank. Its gradient is made NaN, which every optimizer path
            # already discards whole (DeepSpeed's overflow check; the plain path below).
            local_loss, *local_part_values = torch.cat([local_loss_sum.view(1), local_parts]).tolist()  # one transfer
            summed = collectives.all_reduce_sum([local_loss, local_nonpad, *local_part_values]).tolist()
            loss_total, nonpad_total, *part_totals = summed
            skipped = guard.loss_verdict(loss_total / global_tokens)
        engine.backward(loss_sum * (scale if skipped is None else float("nan")))
        if last and clip is not None:
            # Gradients are final (all-reduced) here; the norm is computed once per step, not once by the
            # engine and again for the log.
            own_norm = clip_gradients(engine.module, engine.optimizer, clip)
        engine.step()  # only steps the optimizer at the accumulation boundary
        if last and clip is not None:
            engine.optimizer.grad_scale = None  # this step's clipping factor (clip_gradients) is spent
    grad_norm = own_norm if own_norm is not None else float(engine.get_global_grad_norm() or 0.0)
    # fp16: a finite loss whose gradients overflowed is the loss scaler's business (it skipped the update
    # and lowered the scale, as it must while it searches for its scale), not the guard's.
    overflow = skipped is None and engine.fp16_enabled() and not engine.was_step_applied()
    if skipped is None and not overflow and not math.isfinite(grad_norm):
        skipped = f"gradient norm is {grad_norm}"
    if (skipped is not None or overflow) and clip is None:
        if engine.was_step_applied():
            raise RuntimeError(f"DeepSpeed applied a step with a NaN gradient ({skipped}); please report this")
        # DeepSpeed's overflow path skipped the update and with it the schedule; the plain path (and a
        # non-skipped step) moves the schedule on, so a skip uses up its step's rate on every path.
        engine.lr_scheduler.step()
    parts = {name: v / global_tokens for name, v in zip(objective.parts, part_totals, strict=True)}
    return StepResult(loss_total / global_tokens, grad_norm, int(nonpad_total), skipped, parts, overflow)


def clip_gradients(model, optimizer, max_norm: float) -> float:
    """Clips the gradients to `max_norm` (0: measures only) the way torch's clip_grad_norm_ does, and
    returns their global norm before clipping. With torch's fused AdamW the factor is handed to the
    optimizer's kernel as its `grad_scale` (it divides each gradient as it reads it) instead of a separate
    pass multiplying every gradient in memory: 3 % of a full fine-tuning step at 151,552 vocabulary on CPU
    (docs/performance.md). A non-finite norm drops the gradients: AdamW then leaves every parameter and its
    moments untouched."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if not math.isfinite(float(norm)):
        for p in params:
            p.grad = None
    elif max_norm > 0:
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # clip_grad_norm_'s own arithmetic
        if isinstance(optimizer, torch.optim.Optimizer) and optimizer.defaults.get("fused"):
            optimizer.grad_scale = (1.0 / factor).to(torch.float32)
        else:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def loss_scale(engine) -> float:
    """fp16: the dynamic loss scale now (DeepSpeed's ZeRO optimizers call it loss_scale, FP16_Optimizer cur_scale)."""
    opt = engine.optimizer
    return float(getattr(opt, "loss_scale", None) or getattr(opt, "cur_scale", 0.0))


def takes_over_clipping(engine, world_size: int, max_grad_norm: float) -> float | None:
    """DeepSpeed's ZeRO and bf16/fp16 optimizers clip and record the global norm. Its plain fp32 ZeRO-0
    path clips without keeping the norm, so there the loop clips (the same arithmetic) and keeps it,
    rather than measuring the norm a second time. Returns the `clip` argument of `train_step`."""
    if engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    engine.clip_fp32_gradients = lambda: None  # the loop clips (train_step); the engine would do it again
    if world_size == 1:
        # One process has nothing to reduce, yet the engine would flatten every gradient into a buffer,
        # "all-reduce" it and copy it back each step; dividing by a world size of 1 is exact, so skip it.
        engine.enable_backward_allreduce = False
    return max_grad_norm
