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

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from dist_glm import distributed
from dist_glm.data.batching import collate, model_inputs
from dist_glm.data.template import IGNORE_INDEX
from dist_glm.distill import KDSpec, kd_per_token
from dist_glm.errors import UserError
from dist_glm.loss import CHUNK_ELEMENTS, CrossEntropy, has_native_head, head_returns, sum_over_labelled

MANIFEST = "manifest.json"
ROWS_PER_SHARD = 512


def row_key(example) -> str:
    """What identifies a row's teacher targets: its ids, labels and (packed) positions."""
    h = hashlib.sha1()
    for seq in (example.input_ids, example.labels, example.position_ids or []):
        h.update(torch.tensor(seq, dtype=torch.int64).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()


def _labelled(example) -> bool:
    return any(label != IGNORE_INDEX for label in example.labels[1:])


# ---------------------------------------------------------------- building the cache


@torch.no_grad()
def teacher_top_k(teacher, batch: dict, k: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, logits) of the teacher's k largest logits at every labelled position of `batch`, row-major
    (the order the student's labelled positions come in), computed a chunk of positions at a time."""
    hidden = teacher.hidden_at_labels(model_inputs(batch), batch["labels"])
    chunk = max(1, CHUNK_ELEMENTS // vocab)
    ids, values = [], []
    for i in range(0, hidden.shape[0], chunk):
        z = F.linear(hidden[i : i + chunk], teacher.head_weight).float()[:, :vocab]
        top = z.topk(k, dim=-1)
        ids.append(top.indices.to(torch.int32).cpu())
        values.append(top.values.cpu())
    if not ids:
        return torch.zeros(0, k, dtype=torch.int32), torch.zeros(0, k)
    return torch.cat(ids), torch.cat(values)


def build(cfg, rows: list, teacher, vocab: int, batch_size: int, pad_id: int, device) -> Path:
    """Collective. Shards of ROWS_PER_SHARD rows (sorted by key, so the split is the same for any world
    size), each written whole by one rank and skipped when it exists: an interrupted build resumes."""
    out = Path(cfg.distill.distill_cache)
    k = cfg.distill.distill_top_k
    by_key = {row_key(r): r for r in rows if _labelled(r)}
    keys = sorted(by_key)
    shards = [keys[i : i + ROWS_PER_SHARD] for i in range(0, len(keys), ROWS_PER_SHARD)]
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    out.mkdir(parents=True, exist_ok=True)
    done = 0
    for j in range(rank, len(shards), world):
        path = out / f"shard-{j:05d}.pt"
        if path.is_file():
            continue
        entries = {}
        # Packed rows (training) and unpacked ones (eval sets) are batched apart: collate takes one kind.
        kinds = [[key for key in shards[j] if (by_key[key].position_ids is None) == unpacked] for unpacked in (0, 1)]
        batches = [kind[i : i + batch_size] for kind in kinds for i in range(0, len(kind), batch_size)]
        for batch_keys in batches:
            members = [by_key[key] for key in batch_keys]
            batch = {name: t.to(device) for name, t in collate(members, pad_id).items()}
            ids, values = teacher_top_k(teacher, batch, k, vocab)
            start = 0
            for key, row in zip(batch_keys, members, strict=True):
                n = sum(label != IGNORE_INDEX for label in row.labels[1:])
                entries[key] = (ids[start : start + n].clone(), values[start : start + n].clone())
                start += n
        tmp = path.with_suffix(".tmp")
        torch.save(entries, tmp)
        tmp.rename(path)  # whole or absent: a rerun redoes only missing shards
        done += 1
    distributed.barrier()
    if distributed.is_main_process():
        d = cfg.distill
        manifest = {
            "teacher_model_name_or_path": d.teacher_model_name_or_path,
            "teacher_adapter_name_or_path": d.teacher_adapter_name_or_path,
            "top_k": k,
            "vocab": vocab,
            "rows": len(keys),
            "shards": len(shards),
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    distributed.barrier()
    distributed.log(f"teacher cache {out}: {len(keys)} rows in {len(shards)} shards (this rank wrote {done}), k={k}")
    return out


def build_from_recipe(cfg) -> Path:
    """launch/distill_cache.py: the recipe's rows as training builds them, through the teacher."""
    from dist_glm.data.loading import load_datasets
    from dist_glm.data.packing import pack_examples
    from dist_glm.distill import check_teacher, load_teacher
    from dist_glm.models import load_tokenizer

    d = cfg.distill
    problems = [] if d.teacher_model_name_or_path else ["teacher_model_name_or_path is required: the teacher to cache"]
    problems += [] if d.distill_cache else ["distill_cache is required: the directory to write the cache to"]
    if problems:
        raise UserError(problems)
    problems = check_teacher(cfg, need_teacher=True)
    if problems:
        raise UserError(problems)
    distributed.init_distributed(cfg.train.output_dir, cfg.train.preflight_timeout, cfg.train.ddp_timeout)
    device = distributed.local_device()
    tokenizer = load_tokenizer(cfg.model.model_name_or_path, cfg.model.trust_remote_code)
    train, eval_sets = load_datasets(cfg, tokenizer)
    if cfg.data.packing:  # the rows training will see (dist_glm.train.setup packs the same way)
        train = pack_examples(train, cfg.data.cutoff_len)
    teacher = load_teacher(cfg, {}, device)
    rows = train + [e for examples in eval_sets.values() for e in examples]
    return build(
        cfg, rows, teacher, len(tokenizer), cfg.train.per_device_eval_batch_size, tokenizer.pad_token_id, device
    )


# ---------------------------------------------------------------- training from it


def read_manifest(path: str) -> dict:
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise UserError(
            f"distill_cache='{path}': no {MANIFEST} there; build it first with "
            f"`python launch/distill_cache.py RECIPE --distill_cache={path}` (or finish an interrupted build)"
        )
    return json.loads(file.read_text())


def _chunk_sums(head_forward, h, targets, teacher_ids, teacher_logits, spec: KDSpec) -> torch.Tensor:
    z = head_forward(h).float()
    student = z.gather(1, teacher_ids.long())
    return torch.stack(
        [F.cross_entropy(z, targets, reduction="sum"), kd_per_token(student, teacher_logits, spec).sum()]
    )


def labelled_sums(head_forward, hidden, labels, teacher_ids, teacher_logits, spec: KDSpec, vocab: int) -> torch.Tensor:
    """[CE sum, top-k KD sum] over the labelled positions, a chunk at a time (as dist_glm.distill)."""
    chunk = max(1, CHUNK_ELEMENTS // vocab)
    per_token = (teacher_ids, teacher_logits)
    return sum_over_labelled(_chunk_sums, head_forward, hidden, labels, chunk, per_token, shared=(spec,), shape=2)


class CachedDistillation(CrossEntropy):
    """Distillation from a teacher cache: batches carry the teacher's top-k of their rows."""

    parts = ("ce_loss", "kd_loss")

    def __init__(self, cfg, vocab: int):
        d = cfg.distill
        self.path, self.manifest = d.distill_cache, read_manifest(d.distill_cache)
        self.alpha, self.vocab = d.distill_alpha, vocab
        k = self.manifest["top_k"]
        self.spec = KDSpec(d.distill_loss, d.distill_temperature, d.distill_jsd_beta, k)
        self.eval_spec = KDSpec("forward_kl", 1.0, 0.5, k)
        self.entries = {}
        for shard in sorted(Path(d.distill_cache).glob("shard-*.pt")):
            self.entries.update(torch.load(shard, weights_only=True))
        distributed.log(
            f"distillation from cache {d.distill_cache}: teacher {self.manifest['teacher_model_name_or_path']}, "
            f"top-{k}, {len(self.entries)} rows; {d.distill_loss} at T={d.distill_temperature:g}, alpha={self.alpha:g}"
        )

    def check_rows(self, rows: list) -> None:
        missing = sum(1 for r in rows if _labelled(r) and row_key(r) not in self.entries)
        if missing:
            raise UserError(
                f"distill_cache='{self.path}': {missing} of this run's rows are not in it (other data, template, "
                "cutoff_len, packing or mix_probs than when it was built); rebuild it with launch/distill_cache.py "
                "and this recipe"
            )

    def collate(self, examples, pad_id: int) -> dict[str, torch.Tensor]:
        batch = collate(examples, pad_id)
        k = self.manifest["top_k"]
        found = [self.entries[row_key(e)] for e in examples if _labelled(e)]
        batch["teacher_ids"] = torch.cat([f[0] for f in found]) if found else torch.zeros(0, k, dtype=torch.int32)
        batch["teacher_logits"] = torch.cat([f[1] for f in found]) if found else torch.zeros(0, k)
        return batch

    def sums(self, model, batch: dict, spec: KDSpec) -> torch.Tensor:
        labels, ids, logits = batch["labels"], batch["teacher_ids"], batch["teacher_logits"]
        if not has_native_head(model):
            z = model(**model_inputs(batch)).logits[:, :-1][labels[:, 1:] != IGNORE_INDEX].float()
            return _chunk_sums(lambda _: z, None, labels[:, 1:][labels[:, 1:] != IGNORE_INDEX], ids, logits, spec)

        def compute(head_forward, hidden):
            return labelled_sums(head_forward, hidden, labels, ids, logits, spec, self.vocab).view(1, 1, 2)

        with head_returns(model, compute):
            stand_in = model(**model_inputs(batch)).logits
        return stand_in.reshape(2)

    def loss_sums(self, model, batch: dict):
        ce, kd = self.sums(model, batch, self.spec)
        return self.alpha * kd + (1 - self.alpha) * ce, {"ce_loss": ce, "kd_loss": kd}

    def eval_sums(self, model, batch: dict):
        ce, kl = self.sums(model, batch, self.eval_spec)
        return {"loss": ce, "kl_to_teacher": kl}
