"""Building a teacher cache for offline distillation (launch/distill_cache.py): the recipe's rows exactly as
training builds them, through the teacher once, top-k logits per trainable token in resumable shards."""

from pathlib import Path

import torch
import torch.nn.functional as F

from dist_glm.data.batching import collate, model_inputs
from dist_glm.data.template import IGNORE_INDEX
from dist_glm.errors import UserError
from dist_glm.objectives import row_cache
from dist_glm.objectives.cross_entropy import CHUNK_ELEMENTS
from dist_glm.runtime import collectives, environment

ROWS_PER_SHARD = 512  # rows per shard file: one rank writes it whole, a rerun skips it


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
    """Collective. The teacher's top-k of every labelled row in resumable shards (dist_glm.objectives.row_cache)."""
    out, k = Path(cfg.distill.distill_cache), cfg.distill.distill_top_k

    def shard(keys: list, members: list) -> dict:
        entries, by_key = {}, dict(zip(keys, members, strict=True))
        # Packed rows (training) and unpacked ones (eval sets) are batched apart: collate takes one kind.
        kinds = [[key for key in keys if (by_key[key].position_ids is None) == unpacked] for unpacked in (0, 1)]
        for batch_keys in (kind[i : i + batch_size] for kind in kinds for i in range(0, len(kind), batch_size)):
            batch_rows = [by_key[key] for key in batch_keys]
            batch = {name: t.to(device) for name, t in collate(batch_rows, pad_id).items()}
            ids, values = teacher_top_k(teacher, batch, k, vocab)
            start = 0
            for key, row in zip(batch_keys, batch_rows, strict=True):
                n = sum(label != IGNORE_INDEX for label in row.labels[1:])
                entries[key] = (ids[start : start + n].clone(), values[start : start + n].clone())
                start += n
        return entries

    d = cfg.distill
    manifest = {
        "teacher_model_name_or_path": d.teacher_model_name_or_path,
        "teacher_adapter_name_or_path": d.teacher_adapter_name_or_path,
        "top_k": k,
        "vocab": vocab,
    }
    n_rows, n_shards, done = row_cache.write(out, rows, ROWS_PER_SHARD, shard, manifest)
    collectives.log(f"teacher cache {out}: {n_rows} rows in {n_shards} shards (this rank wrote {done}), k={k}")
    return out


def build_from_recipe(cfg) -> Path:
    """launch/distill_cache.py: the recipe's rows as training builds them, through the teacher."""
    from dist_glm.data.loading import load_datasets
    from dist_glm.methods import get_method
    from dist_glm.models.loading import load_tokenizer
    from dist_glm.objectives.teacher import check_teacher, load_teacher

    d = cfg.distill
    problems = [] if d.teacher_model_name_or_path else ["teacher_model_name_or_path is required: the teacher to cache"]
    problems += [] if d.distill_cache else ["distill_cache is required: the directory to write the cache to"]
    if problems:
        raise UserError(problems)
    problems, teacher_art = check_teacher(cfg, need_teacher=True)
    if problems:
        raise UserError(problems)
    environment.init_distributed(cfg.train.output_dir, cfg.train.preflight_timeout, cfg.train.ddp_timeout)
    device = environment.local_device()
    tokenizer = load_tokenizer(cfg.model.model_name_or_path, cfg.model.trust_remote_code)
    # The rows training will see: packed as training packs them, by the same function.
    data = load_datasets(cfg, tokenizer, get_method(cfg.method.finetuning_type).can_pack)
    train, eval_sets = data.train, data.eval_sets
    teacher = load_teacher(cfg, teacher_art, device=device, ds_config={})
    rows = train + [e for examples in eval_sets.values() for e in examples]
    return build(
        cfg, rows, teacher, len(tokenizer), cfg.train.per_device_eval_batch_size, tokenizer.pad_token_id, device
    )
