"""Token-level cross-entropy as a (sum, count) pair, computed only where labels are.

Returning the sum rather than a mean lets the caller normalise by the *global* number of trainable
tokens in the optimizer step, which makes the loss and gradients independent of how the global
batch is split across ranks and accumulation steps (a per-micro-batch mean over variable-length
samples would weight tokens differently depending on the split).

Where the memory goes at GLM's 151,552-entry vocabulary: the plain computation materialises the
B x T x V logits, then a shifted fp32 copy of them, then the same again for their gradient; in SFT
most of those positions are prompt tokens whose loss is never used. Here the LM head runs only on the
hidden states at labelled positions (labels are shifted, not logits), in chunks of tokens whose
logits are recomputed in backward, so the head's peak is O(chunk x V) and its cost grows with the
trainable tokens, not with the padded sequence. The sum equals the plain one up to summation order.
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dist_glm.data.batching import collate, model_inputs
from dist_glm.data.template import IGNORE_INDEX

# Logit elements per chunk (2**25 fp32 = 128 MiB): ~220 tokens at GLM-4's vocabulary, the whole batch
# at once for a small vocabulary (one chunk costs nothing extra there).
CHUNK_ELEMENTS = 2**25


def count_trainable_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _causal_lm(model):
    model = getattr(model, "module", model)  # a DeepSpeed engine
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model


def has_native_head(model) -> bool:
    """Transformers' own GLM classes and dist_glm's ChatGLM-6B compute `lm_head(hidden)` on batch-first hidden
    states; remote-code models (THUDM's ChatGLM2/3 code is sequence-first and transposes the logits afterwards)
    take the plain path."""
    return type(_causal_lm(model)).__module__.startswith(("transformers.", "dist_glm.models."))


def _chunk_loss_sum(head_forward, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head_forward(hidden).float(), targets, reduction="sum")


def sum_over_labelled(
    chunk_fn, head_forward, hidden, labels, chunk_tokens: int, per_token=(), shared=(), shape=()
) -> torch.Tensor:
    """Sum of `chunk_fn(head_forward, h, targets, *per_token_chunk, *shared)` over chunks of the labelled
    positions of `hidden` (B x T x H, batch-first): the one place that gathers the hidden states there,
    chunks them and recomputes each chunk in backward. `per_token` tensors are row-aligned with those
    positions (the teacher's, for distillation) and chunked alike; `shape` is what a chunk returns."""
    keep = labels[:, 1:] != IGNORE_INDEX
    h = hidden[:, :-1][keep]  # N x H: a gather, the only copy, and of hidden size rather than vocab size
    targets = labels[:, 1:][keep]
    if h.shape[0] == 0:  # keeps the graph (every rank runs the same backward collectives)
        return hidden.sum() * torch.zeros(shape, device=hidden.device)
    assert all(t.shape[0] == h.shape[0] for t in per_token), "per-token targets do not line up with the labels"
    recompute = torch.is_grad_enabled() and h.requires_grad
    total = None
    for i in range(0, h.shape[0], chunk_tokens):
        part = slice(i, i + chunk_tokens)
        args = (head_forward, h[part], targets[part], *(t[part] for t in per_token), *shared)
        # Recomputing a chunk's logits in backward is what keeps only one chunk of them alive at a time.
        sums = checkpoint(chunk_fn, *args, use_reentrant=False) if recompute else chunk_fn(*args)
        total = sums if total is None else total + sums
    return total


def labelled_loss_sum(head_forward, hidden: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Sum of next-token cross-entropy over the labelled positions of `hidden` (B x T x H, batch-first)."""
    return sum_over_labelled(_chunk_loss_sum, head_forward, hidden, labels, max(1, CHUNK_ELEMENTS // vocab_size))


@contextmanager
def head_returns(model, compute):
    """While active, the model's `lm_head(hidden)` call returns `compute(head_forward, hidden)` (a small
    stand-in for logits, e.g. the 1 x 1 x 1 labelled loss sum) instead of logits. Doing it inside the
    head's own call matters under ZeRO-3: the head's forward hooks gather its weight once for all chunks,
    and the tensor the call returns carries ZeRO-3's backward hook, which gathers the weight again for
    the recomputation (so the caller must use the returned tensor, not one captured inside)."""
    lm = _causal_lm(model)
    head = lm.get_output_embeddings()
    previous = head.__dict__.get("forward")
    original = head.forward

    def forward(hidden, *args, **kwargs):
        return compute(original, hidden)

    head.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


def vocab_size_of(model) -> int:
    return _causal_lm(model).config.vocab_size


def sums_from_head(model, inputs: dict, compute, size: int) -> torch.Tensor:
    """Forward `model` on `inputs` with its LM head call returning `compute(head_forward, hidden)`, a
    vector of `size` sums (see `head_returns`), and return that vector. Every objective that runs the head
    on labelled positions only goes through here."""
    with head_returns(model, lambda head, hidden: compute(head, hidden).view(1, 1, size)):
        stand_in = model(**inputs).logits
    assert stand_in.numel() == size, f"expected {size} sums from the LM head, got shape {tuple(stand_in.shape)}"
    return stand_in.reshape(size)


def token_loss_sum(model, inputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Forward `model` (an engine, a PEFT or a plain causal LM) on `inputs` and return the sum of
    next-token losses over labelled positions (in fp32) and how many there were."""
    count = count_trainable_tokens(labels)
    if not has_native_head(model):
        return plain_token_loss_sum(model(**inputs).logits, labels), count
    vocab = vocab_size_of(model)
    loss_sum = sums_from_head(model, inputs, lambda head, hidden: labelled_loss_sum(head, hidden, labels, vocab), 1)
    return loss_sum[0], count


class CrossEntropy:
    """The training objective of every method: next-token cross-entropy on the labelled tokens (an
    `Objective`: see dist_glm.objectives)."""

    parts: tuple[str, ...] = ()
    per_token = True

    def collate(self, examples, pad_id: int) -> dict[str, torch.Tensor]:
        return collate(examples, pad_id)

    def count(self, batch: dict) -> int:
        return count_trainable_tokens(batch["labels"])

    def check_rows(self, rows: list) -> None:
        """Refuse, before the first step, rows this objective cannot train on (none here)."""

    def prepare(self, model, batches: list[dict], device) -> None:
        """A token's loss needs nothing beyond its own row."""

    def loss_sums(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return token_loss_sum(model, model_inputs(batch), batch["labels"])[0], {}

    def eval_sums(self, model, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": token_loss_sum(model, model_inputs(batch), batch["labels"])[0]}


def plain_token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The straightforward computation over full logits: the reference the tests compare against, and
    the path for models whose head cannot be run on gathered positions."""
    return F.cross_entropy(
        logits[:, :-1, :].float().reshape(-1, logits.size(-1)),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
