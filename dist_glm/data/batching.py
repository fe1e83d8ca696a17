"""Tokenised datasets, padding, and the global-batch sampler that makes every split equivalent.

The sampler fixes the *global* batch of each optimizer step from (seed, epoch) alone; ranks and
accumulation micro-steps only decide who computes which slice of it. So 1 rank x micro-batch 4,
2 ranks x micro-batch 2 and 1 rank x micro-batch 2 x accumulation 2 see exactly the same samples per
step, and resuming at step N needs no replay: the position is a function of N.
"""

from dataclasses import dataclass

import torch

from dist_glm.data.formats import load_conversations
from dist_glm.data.template import IGNORE_INDEX, Glm4Template


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int]  # for generation: the prompt only
    reference: str  # the reply text, for generation metrics


def build_examples(spec: str, tokenizer, data_cfg, max_samples: int = 0) -> list[Example]:
    template = Glm4Template(tokenizer)
    out = []
    for messages in load_conversations(spec, data_cfg):
        input_ids, labels = template.encode(messages, data_cfg.cutoff_len)
        out.append(Example(input_ids, labels, template.encode_prompt(messages[:-1]), messages[-1]["content"]))
        if max_samples and len(out) >= max_samples:
            break
    return out


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample; labels are pre-shifted-free (the loss shifts them)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class GlobalBatchSampler:
    """Indices of the micro-batches that one rank computes for one optimizer step."""

    def __init__(self, num_samples: int, micro_batch: int, grad_accum: int, world_size: int, seed: int):
        self.n, self.mbs, self.gas, self.world, self.seed = num_samples, micro_batch, grad_accum, world_size, seed
        self.global_batch = micro_batch * grad_accum * world_size
        # Drop the ragged tail of each epoch, so every step has the same global batch size.
        self.steps_per_epoch = num_samples // self.global_batch

    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        return torch.randperm(self.n, generator=g)

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Step counts from 0. Micro-step m of rank r takes slice (m * world + r) of the global batch."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        order = self._order(epoch)[pos * self.global_batch : (pos + 1) * self.global_batch].tolist()
        return [
            order[(m * self.world + rank) * self.mbs : (m * self.world + rank + 1) * self.mbs] for m in range(self.gas)
        ]
