"""Building a teacher cache for offline distillation (launch/distill_cache.py): the recipe's rows exactly as
training builds them, through the teacher once, top-k logits per trainable token in resumable shards."""

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from dist_glm.data.batching import collate, model_inputs
from dist_glm.data.template import IGNORE_INDEX
from dist_glm.errors import UserError
from dist_glm.objectives.cached_distillation import MANIFEST, is_labelled, row_key
from dist_glm.objectives.cross_entropy import CHUNK_ELEMENTS
from dist_glm.runtime import collectives, environment
from dist_glm.runtime.staging import unique_temp_file

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
    """Collective. Shards of ROWS_PER_SHARD rows (sorted by key, so the split is the same for any world
    size), each written whole by one rank and skipped when it exists: an interrupted build resumes."""
    out = Path(cfg.distill.distill_cache)
    k = cfg.distill.distill_top_k
    by_key = {row_key(r): r for r in rows if is_labelled(r)}
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
        tmp = unique_temp_file(path)  # a fresh name: distill_cache is the user's directory
        torch.save(entries, tmp)
        tmp.rename(path)  # whole or absent: a rerun redoes only missing shards
        done += 1
    collectives.barrier()
    if collectives.is_main_process():
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
    collectives.barrier()
    collectives.log(f"teacher cache {out}: {len(keys)} rows in {len(shards)} shards (this rank wrote {done}), k={k}")
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
