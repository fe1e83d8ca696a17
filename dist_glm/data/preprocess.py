"""Tokenize once: rank 0 (or `launch/prepare.py`, ahead of time) writes a cache that every rank and
node reuses.

The cache key covers the data files' bytes, the tokenizer's files, the resolved template and every
data setting, plus CACHE_VERSION (bumped when the encoding code changes), so a changed input can
never reuse a stale cache. The cache directory must be shared by all nodes (it defaults to
`.dist_glm_cache/` beside the first dataset file, which multi-node jobs keep on shared storage).
"""

import dataclasses
import hashlib
import json
import os
import pickle
from pathlib import Path

from dist_glm.data.batching import DataStats, Example, build_examples
from dist_glm.data.formats import split_paths
from dist_glm.errors import UserError

CACHE_VERSION = 3  # bump whenever the tokenized output or the cached fields change
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.tiktoken",
)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(spec: str, tokenizer_dir: str, template: str, data_cfg, max_samples: int) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    for path in split_paths(spec):
        h.update(f"data:{Path(path).resolve()}:{_sha256_file(Path(path))}".encode())
    for name in TOKENIZER_FILES:
        p = Path(tokenizer_dir) / name
        if p.is_file():
            h.update(f"tok:{name}:{_sha256_file(p)}".encode())
    settings = {
        k: v
        for k, v in dataclasses.asdict(data_cfg).items()
        if k not in ("dataset", "eval_dataset", "data_cache_dir", "packing", "val_size", "mix_probs")
    }
    h.update(json.dumps({**settings, "template": template, "max_samples": max_samples}, sort_keys=True).encode())
    return h.hexdigest()[:20]


def cache_dir(data_cfg) -> Path:
    if data_cfg.data_cache_dir:
        return Path(data_cfg.data_cache_dir)
    return Path(split_paths(data_cfg.dataset)[0]).resolve().parent / ".dist_glm_cache"


def tokenize_to_cache(
    spec: str, tokenizer, tokenizer_dir: str, template: str, data_cfg, max_samples: int = 0
) -> tuple[Path, bool]:
    """Write the cache file for `spec` unless it exists. Returns (path, whether it tokenized)."""
    path = cache_dir(data_cfg) / f"{cache_key(spec, tokenizer_dir, template, data_cfg, max_samples)}.pkl"
    if path.is_file():
        return path, False
    examples, stats = build_examples(spec, tokenizer, data_cfg, template, max_samples)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        pickle.dump({"examples": [dataclasses.astuple(e) for e in examples], "stats": stats}, f)
    tmp.rename(path)  # atomic: a reader never sees half a cache
    return path, True


def load_cache(path: Path) -> tuple[list[Example], DataStats]:
    with open(path, "rb") as f:
        data = pickle.load(f)
    return [Example(*e) for e in data["examples"]], data["stats"]


def tokenize_dataset(
    spec: str, tokenizer, tokenizer_dir: str, template: str, data_cfg, max_samples: int = 0, log=print
) -> tuple[list[Example], DataStats]:
    """Collective when a process group exists: rank 0 tokenizes (or finds the cache), the others wait,
    then all load the same file. A UserError on rank 0 (a bad row) is passed to every rank, so no rank
    is left waiting for a cache that will never come."""
    import torch.distributed as dist

    from dist_glm.distributed import barrier, broadcast_object, is_main_process

    result = None
    if is_main_process():
        try:
            path, tokenized = tokenize_to_cache(spec, tokenizer, tokenizer_dir, template, data_cfg, max_samples)
            result = {"path": str(path), "tokenized": tokenized}
        except UserError as e:
            result = {"error": e.problems}
    result = broadcast_object(result) if dist.is_initialized() else result
    if "error" in result:
        raise UserError(result["error"])
    barrier()
    examples, stats = load_cache(Path(result["path"]))
    verb = "tokenized into" if result["tokenized"] else "reused cache"
    log(f"{verb} {result['path']}: " + stats.summary(spec))
    return examples, stats
