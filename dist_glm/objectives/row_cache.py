"""Caches keyed by row, written once ahead of training by a tool and read whole by every rank: the teacher cache
of offline distillation (tools/distill_cache.py) and the reference cache of preference training
(tools/ref_cache.py). A row's key is a hash of its tokens, labels and positions, so a cache fits any number of
ranks, batch sizes and step counts; shards are written whole by one rank each and skipped when they exist, so
an interrupted build resumes; the manifest, written last, says what the cache holds."""

import hashlib
import json
from pathlib import Path

import torch

from dist_glm.data.template import IGNORE_INDEX
from dist_glm.errors import UserError
from dist_glm.runtime import collectives

MANIFEST = "manifest.json"


def row_key(example) -> str:
    """What identifies a row's cached values: its ids, labels and (packed) positions."""
    h = hashlib.sha1()
    for seq in (example.input_ids, example.labels, example.position_ids or []):
        h.update(torch.tensor(seq, dtype=torch.int64).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()


def is_labelled(example) -> bool:
    return any(label != IGNORE_INDEX for label in example.labels[1:])


def read_manifest(directory: str, key: str, build: str) -> dict:
    """The manifest of the cache `directory` (named by the option `key`), or a UserError saying how to build it
    (`build`: the command)."""
    file = Path(directory) / MANIFEST
    if not file.is_file():
        raise UserError(
            f"{key}='{directory}': no {MANIFEST} there; build it first with `{build} RECIPE --{key}={directory}` (or "
            "finish an interrupted build)"
        )
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{key}='{directory}': {MANIFEST} is not valid JSON ({e}); rebuild the cache") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{key}='{directory}': {MANIFEST} is not a JSON object; rebuild the cache")
    return manifest


def load_entries(directory: str) -> dict:
    entries = {}
    for shard in sorted(Path(directory).glob("shard-*.pt")):
        entries.update(torch.load(shard, weights_only=True))
    return entries


def write(out: Path, rows: list, rows_per_shard: int, compute, manifest: dict) -> tuple[int, int, int]:
    """Collective. The labelled rows in shards of `rows_per_shard` (sorted by key, so the split is the same for
    any world size); `compute(keys, rows)` returns one shard's {key: value}. Then the manifest (with the row and
    shard counts). Returns (rows, shards, shards this rank wrote)."""
    from dist_glm.runtime.staging import unique_temp_file

    by_key = {row_key(r): r for r in rows if is_labelled(r)}
    keys = sorted(by_key)
    shards = [keys[i : i + rows_per_shard] for i in range(0, len(keys), rows_per_shard)]
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    out.mkdir(parents=True, exist_ok=True)
    done = 0
    for j in range(rank, len(shards), world):
        path = out / f"shard-{j:05d}.pt"
        if path.is_file():
            continue
        entries = compute(shards[j], [by_key[key] for key in shards[j]])
        tmp = unique_temp_file(path)  # a fresh name: the cache directory is the user's
        torch.save(entries, tmp)
        tmp.rename(path)  # whole or absent: a rerun redoes only missing shards
        done += 1
    collectives.barrier()
    if collectives.is_main_process():
        (out / MANIFEST).write_text(json.dumps({**manifest, "rows": len(keys), "shards": len(shards)}, indent=2))
    collectives.barrier()
    return len(keys), len(shards), done
