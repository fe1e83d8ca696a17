"""Offline distillation: the teacher runs once over the training rows, its top-k logits per trainable
token are cached, and training needs no teacher in memory.

`launch/distill_cache.py RECIPE --distill_cache=DIR --distill_top_k=64` builds the rows exactly as
training will (tokenization, mixture, packing), runs the teacher over them and over the eval sets, and
writes shards of `{row key: (top-k token ids, their logits)}`; training with `distill_cache=DIR` looks
every row up by its key (a hash of its tokens, labels and positions), so the cache fits any number of
ranks, batch sizes and step counts, and a row the cache lacks is an error before the first step.

The KD term on top-k is the divergence between the two models' distributions *restricted to the
teacher's top-k tokens and renormalised there* (the student's logits are gathered at the teacher's
ids). At k = vocabulary size it is the online KD exactly (tested); at k = 32-128 it keeps the head of
the teacher's distribution, where nearly all of its mass is, and drops the tail, and the student's mass
outside the teacher's top-k is not trained by KD (the cross-entropy term, alpha < 1, still is). Storage
is 8 bytes x k per trainable token (64 MiB per million tokens at k = 8; 512 MiB at k = 64), read into
each rank's memory at start-up.
"""

import torch
import torch.nn.functional as F

from dist_glm.data.batching import collate, model_inputs
from dist_glm.data.template import IGNORE_INDEX
from dist_glm.errors import UserError
from dist_glm.objectives import row_cache
from dist_glm.objectives.cross_entropy import (
    CHUNK_ELEMENTS,
    count_trainable_tokens,
    has_native_head,
    sum_over_labelled,
    sums_from_head,
)
from dist_glm.objectives.distillation import KDMix, KDSpec, kd_per_token
from dist_glm.objectives.row_cache import is_labelled, row_key
from dist_glm.runtime import collectives


def read_manifest(path: str) -> dict:
    manifest = row_cache.read_manifest(path, "distill_cache", "python launch/distill_cache.py")
    need = {"top_k": int, "vocab": int, "rows": int, "teacher_model_name_or_path": str}
    if not all(isinstance(manifest.get(k), t) for k, t in need.items()):
        raise UserError(
            f"distill_cache='{path}': {row_cache.MANIFEST} lacks {', '.join(need)} of the right types; "
            "rebuild the cache"
        )
    return manifest


def _chunk_sums(head_forward, h, targets, teacher_ids, teacher_logits, spec: KDSpec) -> torch.Tensor:
    z = head_forward(h).float()
    student = z.gather(1, teacher_ids.long())
    return torch.stack(
        [F.cross_entropy(z, targets, reduction="sum"), kd_per_token(student, teacher_logits, spec).sum()]
    )


def labelled_sums(head_forward, hidden, labels, teacher_ids, teacher_logits, spec: KDSpec, vocab: int) -> torch.Tensor:
    """[CE sum, top-k KD sum] over the labelled positions, a chunk at a time (as dist_glm.objectives.distillation)."""
    chunk = max(1, CHUNK_ELEMENTS // vocab)
    per_token = (teacher_ids, teacher_logits)
    return sum_over_labelled(_chunk_sums, head_forward, hidden, labels, chunk, per_token, shared=(spec,), shape=2)


class CachedDistillation:
    """Distillation from a teacher cache (an `Objective`): batches carry the teacher's top-k of their rows."""

    parts = KDMix.parts
    per_token = True

    def __init__(self, cfg, vocab: int):
        d = cfg.distill
        self.path, self.manifest = d.distill_cache, read_manifest(d.distill_cache)
        self.vocab = vocab
        k = self.manifest["top_k"]
        self.mix = KDMix.from_config(d, k)  # the divergences compare the k cached entries
        self.entries = row_cache.load_entries(d.distill_cache)
        collectives.log(
            f"distillation from cache {d.distill_cache}: teacher {self.manifest['teacher_model_name_or_path']}, "
            f"top-{k}, {len(self.entries)} rows; {d.distill_loss} at T={d.distill_temperature:g}, "
            f"alpha={self.mix.alpha:g}"
        )

    def count(self, batch: dict) -> int:
        return count_trainable_tokens(batch["labels"])

    def prepare(self, model, batches: list[dict], device) -> None:
        """A token's loss needs nothing beyond its own row and its cached targets."""

    def check_rows(self, rows: list) -> None:
        missing = sum(1 for r in rows if is_labelled(r) and row_key(r) not in self.entries)
        if missing:
            raise UserError(
                f"distill_cache='{self.path}': {missing} of this run's rows are not in it (other data, template, "
                "cutoff_len, packing or mix_probs than when it was built); rebuild it with launch/distill_cache.py "
                "and this recipe"
            )

    def collate(self, examples, pad_id: int) -> dict[str, torch.Tensor]:
        batch = collate(examples, pad_id)
        k = self.manifest["top_k"]
        found = [self.entries[row_key(e)] for e in examples if is_labelled(e)]
        batch["teacher_ids"] = torch.cat([f[0] for f in found]) if found else torch.zeros(0, k, dtype=torch.int32)
        batch["teacher_logits"] = torch.cat([f[1] for f in found]) if found else torch.zeros(0, k)
        return batch

    def sums(self, model, batch: dict, spec: KDSpec) -> torch.Tensor:
        labels, ids, logits = batch["labels"], batch["teacher_ids"], batch["teacher_logits"]
        if not has_native_head(model):
            z = model(**model_inputs(batch)).logits[:, :-1][labels[:, 1:] != IGNORE_INDEX].float()
            return _chunk_sums(lambda _: z, None, labels[:, 1:][labels[:, 1:] != IGNORE_INDEX], ids, logits, spec)
        return sums_from_head(
            model,
            model_inputs(batch),
            lambda head, hidden: labelled_sums(head, hidden, labels, ids, logits, spec, self.vocab),
            2,
        )

    def loss_sums(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.mix.loss_sums(lambda spec: self.sums(model, batch, spec))

    def eval_sums(self, model, batch: dict) -> dict[str, torch.Tensor]:
        return self.mix.eval_sums(lambda spec: self.sums(model, batch, spec))
