"""Precomputing the reference log-probabilities of a preference recipe (launch/ref_cache.py): every row
training will see (both answers of each pair; each KTO answer and its mismatched row; the eval sets'), built
exactly as training builds them, through the frozen reference once, in resumable shards keyed by row. Training
with `ref_logps_cache=DIR` then loads no reference model (dist_glm.objectives.reference)."""

import json
from pathlib import Path

import torch

from dist_glm.data.batching import collate
from dist_glm.errors import UserError
from dist_glm.objectives import row_cache
from dist_glm.objectives.reference import load_frozen, reference_source, row_logps
from dist_glm.runtime import collectives, environment

ROWS_PER_SHARD = 1024  # rows per shard file: one rank writes it whole, a rerun skips it


def _check_directory(out: Path, source: dict) -> None:
    """A directory that holds another reference's cache is not added to (nor is anything in it replaced)."""
    file = out / row_cache.MANIFEST
    if not file.is_file():
        return
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        manifest = None
    if not isinstance(manifest, dict) or {k: manifest.get(k) for k in source} != source:
        raise UserError(
            f"ref_logps_cache='{out}' already holds a cache of another reference (its {row_cache.MANIFEST}); name a "
            "new directory (nothing there is replaced)"
        )


def build(cfg, rows: list, reference, batch_size: int, pad_id: int, device) -> Path:
    """Collective. Each labelled row's reference log-probability in resumable shards (dist_glm.objectives.row_cache)."""
    out = Path(cfg.preference.ref_logps_cache)

    def shard(keys: list, members: list) -> dict:
        entries = {}
        for i in range(0, len(keys), batch_size):
            batch = {name: t.to(device) for name, t in collate(members[i : i + batch_size], pad_id).items()}
            with torch.no_grad():
                logps = row_logps(reference, batch).float().cpu().tolist()
            entries.update(zip(keys[i : i + batch_size], logps, strict=True))
        return entries

    manifest = {**reference_source(cfg), "dtype": str(cfg.train.dtype)}
    n_rows, n_shards, done = row_cache.write(out, rows, ROWS_PER_SHARD, shard, manifest)
    collectives.log(f"reference cache {out}: {n_rows} rows in {n_shards} shards (this rank wrote {done})")
    return out


def build_from_recipe(cfg) -> Path:
    """launch/ref_cache.py: the recipe's rows as training builds them, through the frozen reference."""
    from dist_glm.data.loading import load_datasets
    from dist_glm.data.preference import as_rows
    from dist_glm.models.artifacts import resolve_artifact
    from dist_glm.models.loading import load_tokenizer

    p = cfg.preference
    problems = [] if p.enabled else [f"stage={p.stage}: reference log-probabilities are for stage dpo or kto"]
    problems += [] if p.ref_logps_cache else ["ref_logps_cache is required: the directory to write the cache to"]
    if p.enabled and not p.needs_reference:
        problems.append(f"pref_loss={p.pref_loss} needs no reference model; there is nothing to cache")
    if problems:
        raise UserError(problems)
    source = reference_source(cfg)
    resolve_artifact(source["reference"], source["adapter"])  # a wrong path is one line, before any process group
    _check_directory(Path(p.ref_logps_cache), source)
    environment.init_distributed(cfg.train.output_dir, cfg.train.preflight_timeout, cfg.train.ddp_timeout)
    device = environment.local_device()
    tokenizer = load_tokenizer(cfg.model.model_name_or_path, cfg.model.trust_remote_code)
    data = load_datasets(cfg, tokenizer)  # the pairs / answers training builds, by the same function
    rows = as_rows(data.train + [s for samples in data.eval_sets.values() for s in samples])
    reference = load_frozen(cfg, {}, device)
    return build(cfg, rows, reference, cfg.train.per_device_eval_batch_size, tokenizer.pad_token_id, device)
