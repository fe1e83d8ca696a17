"""Evaluation during training: loss/perplexity on the eval set and, optionally, generation metrics.

Both are collectives. Every rank runs the same number of forward passes (ZeRO-3 gathers weights
inside each forward, so a rank that stopped early would hang the others): the eval set is split
into equal shards, and padding slots in the last shard carry no labels and no weight.
"""

import math

import torch

from dist_glm import distributed
from dist_glm.data.batching import Example, collate, model_inputs
from dist_glm.loss import token_loss_sum
from dist_glm.metrics import generation_metrics


def _shard(n: int, rank: int, world: int) -> list[int | None]:
    per_rank = math.ceil(n / world)
    idx = list(range(rank * per_rank, min(n, (rank + 1) * per_rank)))
    return idx + [None] * (per_rank - len(idx))  # None = padding slot


def _batches(slots: list, size: int):
    for i in range(0, len(slots), size):
        yield slots[i : i + size]


@torch.no_grad()
def eval_loss(engine, examples: list[Example], batch_size: int, pad_id: int, device) -> dict[str, float]:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    engine.eval()
    loss_sum, tokens = 0.0, 0
    for slot_batch in _batches(_shard(len(examples), rank, world), batch_size):
        # A padding slot repeats example 0 with every label masked, so it costs compute but no loss.
        batch_examples = [
            examples[i]
            if i is not None
            else Example(examples[0].input_ids, [-100] * len(examples[0].input_ids), [], "")
            for i in slot_batch
        ]
        batch = {k: v.to(device) for k, v in collate(batch_examples, pad_id).items()}
        logits = engine(**model_inputs(batch)).logits
        s, n = token_loss_sum(logits, batch["labels"])
        loss_sum, tokens = loss_sum + float(s), tokens + n
    engine.train()
    total_loss, total_tokens = distributed.all_reduce_sum([loss_sum, tokens]).tolist()
    mean = total_loss / max(total_tokens, 1)
    return {"eval/loss": mean, "eval/perplexity": math.exp(min(mean, 50.0))}


@torch.no_grad()
def predict(
    engine,
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
    model = engine.module
    model.eval()
    pad_id = tokenizer.pad_token_id
    local = []
    for slot_batch in _batches(_shard(len(examples), rank, world), batch_size):
        prompts = [examples[i if i is not None else 0].prompt_ids for i in slot_batch]
        width = max(len(p) for p in prompts)
        # Left padding so that every prompt ends where generation starts.
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.generate(
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
    model.train()
    # Gathering Python objects is fine here: predictions are short strings, gathered once per eval.
    merged = sorted(p for part in distributed.all_gather_objects(local) for p in part)
    predictions = [text for _, text in merged]
    metrics = generation_metrics(predictions, [e.reference for e in examples])
    return predictions, {f"eval/{k}": v for k, v in metrics.items()}
