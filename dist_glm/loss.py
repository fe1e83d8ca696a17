"""Token-level cross-entropy as a (sum, count) pair.

Returning the sum rather than a mean lets the caller normalise by the *global* number of trainable
tokens in the optimizer step, which makes the loss and gradients independent of how the global
batch is split across ranks and accumulation steps (a per-micro-batch mean over variable-length
samples would weight tokens differently depending on the split).
"""

import torch
import torch.nn.functional as F

from dist_glm.data.template import IGNORE_INDEX


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token losses over labelled positions (in fp32), and how many there were."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    loss_sum = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss_sum, int((shift_labels != IGNORE_INDEX).sum())


def count_trainable_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
