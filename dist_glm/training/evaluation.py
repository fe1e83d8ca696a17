"""Evaluation a training run and the evaluate command share: the objective's sums averaged over an eval
set (sharded over ranks, gathered once), and generation with its metrics."""

import math

import torch

from dist_glm.data.batching import Example
from dist_glm.objectives.cross_entropy import CrossEntropy
from dist_glm.runtime import collectives
from dist_glm.training.scoring import generation_metrics


def _generator(model):
    """The module that has `generate`: a DeepSpeed engine wraps the HF model it trains."""
    from deepspeed import DeepSpeedEngine

    return model.module if isinstance(model, DeepSpeedEngine) else model


def _shard(n: int, rank: int, world: int) -> list[int | None]:
    per_rank = math.ceil(n / world)
    idx = list(range(rank * per_rank, min(n, (rank + 1) * per_rank)))
    return idx + [None] * (per_rank - len(idx))  # None = padding slot


def _batches(slots: list, size: int):
    for i in range(0, len(slots), size):
        yield slots[i : i + size]


@torch.no_grad()
def eval_loss(model, examples: list[Example], batch_size: int, pad_id: int, device, objective=None) -> dict[str, float]:
    """Mean per trainable token of what the objective evaluates: `eval/loss` (cross-entropy) and, when
    distilling, `eval/kl_to_teacher`. Collective."""
    objective = objective or CrossEntropy()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    was_training = model.training
    model.eval()
    sums, tokens, batches = {}, 0, []
    for slot_batch in _batches(_shard(len(examples), rank, world), batch_size):
        # A padding slot repeats example 0 with every label masked, so it costs compute but no loss (and counts
        # nothing: no token, no pair).
        batch_examples = [examples[i] if i is not None else examples[0].masked() for i in slot_batch]
        batches.append(objective.collate(batch_examples, pad_id))  # token ids on the host until their turn
    objective.prepare(model, batches, device)  # collective: what the loss needs from the whole eval set
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        for name, s in objective.eval_sums(model, batch).items():
            sums[name] = sums.get(name, 0.0) + float(s)
        tokens += objective.count(batch)
    model.train(was_training)
    names = sorted(sums)
    *totals, total_tokens = collectives.all_reduce_sum([sums[n] for n in names] + [tokens]).tolist()
    means = {name: total / max(total_tokens, 1) for name, total in zip(names, totals, strict=True)}
    loss = means.pop("loss")
    record = {"eval/loss": loss}
    if objective.per_token:  # a per-token cross-entropy has a perplexity; a loss per preference pair has none
        record["eval/perplexity"] = math.exp(min(loss, 50.0))
    record.update({f"eval/{name}": value for name, value in means.items()})
    return record


@torch.no_grad()
def predict(
    model,
    examples: list[Example],
    tokenizer,
    batch_size: int,
    max_new_tokens: int,
    eos_ids: list[int],
    synced_gpus: bool,
    device,
) -> tuple[list[str], dict[str, float]]:
    """Greedy generation for the whole eval set; returns (predictions in input order, metrics)."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    was_training = model.training
    model.eval()
    generator = _generator(model)
    pad_id = tokenizer.pad_token_id
    local = []
    for slot_batch in _batches(_shard(len(examples), rank, world), batch_size):
        prompts = [examples[i if i is not None else 0].prompt_ids for i in slot_batch]
        width = max(len(p) for p in prompts)
        # Left padding so that every prompt ends where generation starts.
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = generator.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_ids,
            pad_token_id=pad_id,
            use_cache=True,
            synced_gpus=synced_gpus,
        )
        for i, row in zip(slot_batch, out[:, width:].tolist(), strict=True):
            if i is not None:
                cut = next((j for j, t in enumerate(row) if t in eos_ids), len(row))
                # GLM replies start with the newline that follows <|assistant|>; it is not part of the answer.
                local.append((i, tokenizer.decode(row[:cut], skip_special_tokens=True).removeprefix("\n")))
    model.train(was_training)
    # Gathering Python objects is fine here: predictions are short strings, gathered once per eval.
    merged = sorted(p for part in collectives.all_gather_objects(local) for p in part)
    predictions = [text for _, text in merged]
    metrics = generation_metrics(predictions, [e.reference for e in examples])
    return predictions, {f"eval/{k}": v for k, v in metrics.items()}
