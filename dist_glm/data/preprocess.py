"""Tokenize once: rank 0 (or `launch/prepare.py`, ahead of time) writes a cache that every rank and
node reuses.

The cache key covers the data files' bytes, the tokenizer's files, the resolved template and every
data setting, plus CACHE_VERSION (bumped when the encoding code changes), so a changed input can
never reuse a stale cache. The cache directory must be shared by all nodes (it defaults to
`.dist_glm_cache/` beside the first dataset file, which multi-node jobs keep on shared storage).

A cache is a directory of flat arrays (token ids, labels and prompt ids of all samples concatenated,
plus offsets; `.npy`, read with pickling disabled) and JSON (references, statistics, a manifest of file
sizes), written beside its final name and renamed when complete. Every rank memory-maps the arrays:
start-up costs no unpickling, memory holds only the rows a rank touches, and a crafted file on shared
storage is data, never code.
"""

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from dist_glm.data.batching import DataStats, Example, build_samples, example_at
from dist_glm.data.sources import split_paths
from dist_glm.errors import UserError

CACHE_VERSION = 8  # bump whenever the tokenized output or the cached fields change
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


# Settings that do not change the tokenized samples (they act on them afterwards, or on how fast).
NOT_IN_KEY = (
    "dataset",
    "eval_dataset",
    "data_cache_dir",
    "packing",
    "val_size",
    "mix_probs",
    "preprocessing_num_workers",
)


def cache_key(spec: str, tokenizer_dir: str, template: str, data_cfg, max_samples: int) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    for path in split_paths(spec):
        h.update(f"data:{Path(path).resolve()}:{_sha256_file(Path(path))}".encode())
    for name in TOKENIZER_FILES:
        p = Path(tokenizer_dir) / name
        if p.is_file():
            h.update(f"tok:{name}:{_sha256_file(p)}".encode())
    settings = {k: v for k, v in dataclasses.asdict(data_cfg).items() if k not in NOT_IN_KEY}
    h.update(json.dumps({**settings, "template": template, "max_samples": max_samples}, sort_keys=True).encode())
    return h.hexdigest()[:20]


def cache_dir(data_cfg) -> Path:
    if data_cfg.data_cache_dir:
        return Path(data_cfg.data_cache_dir)
    return Path(split_paths(data_cfg.dataset)[0]).resolve().parent / ".dist_glm_cache"


ARRAYS = ("input_ids", "labels", "offsets", "prompt_ids", "prompt_offsets")


def tokenize_to_cache(
    spec: str, tokenizer, tokenizer_dir: str, template: str, data_cfg, max_samples: int = 0
) -> tuple[Path, bool]:
    """Write the cache directory for `spec` unless a complete one exists. Returns (path, whether it tokenized)."""
    path = cache_dir(data_cfg) / cache_key(spec, tokenizer_dir, template, data_cfg, max_samples)
    if _complete(path):
        return path, False
    samples, stats = build_samples(spec, tokenizer, data_cfg, template, max_samples)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for name in ARRAYS:
        np.save(tmp / f"{name}.npy", getattr(samples, name), allow_pickle=False)
    (tmp / "references.json").write_text(json.dumps(samples.references, ensure_ascii=False))
    (tmp / "stats.json").write_text(json.dumps(dataclasses.asdict(stats), ensure_ascii=False))
    sizes = {f.name: f.stat().st_size for f in tmp.iterdir()}
    (tmp / MANIFEST).write_text(json.dumps(sizes))  # written last: its presence means complete
    if path.exists():  # an incomplete leftover (a killed writer on another node)
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)  # atomic: a reader never sees half a cache
    return path, True


MANIFEST = "manifest.json"


def _complete(path: Path) -> bool:
    """Whether `path` is a whole cache: its manifest exists and every file has the size it records."""
    try:
        sizes = json.loads((path / MANIFEST).read_text())
        return all((path / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError):
        return False


class CachedExamples:
    """The examples of one cache, read from its memory-mapped arrays on access (a sequence of Example)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in ARRAYS}
        except ValueError as e:  # an object array (a pickle) where plain integers belong: never unpickled
            raise UserError(
                f"tokenization cache '{path}' holds a file that is not plain data ({e}); delete the directory "
                "and rerun to rebuild it"
            ) from None
        self._references = None

    def __len__(self) -> int:
        return len(self.arrays["offsets"]) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self._references is None:  # only generation needs them: read once, when first asked for
            self._references = json.loads((self.path / "references.json").read_text(encoding="utf-8"))
        return example_at(self.arrays, i, self._references[i])

    def lengths(self) -> list[int]:
        return np.diff(self.arrays["offsets"]).tolist()

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __add__(self, other):
        return list(self) + list(other)


def load_cache(path: Path) -> tuple[CachedExamples, DataStats]:
    if not _complete(path):
        raise UserError(f"tokenization cache '{path}' is incomplete; delete it and rerun (it will be rebuilt)")
    stats = DataStats(**json.loads((path / "stats.json").read_text(encoding="utf-8")))
    return CachedExamples(path), stats


def tokenize_dataset(
    spec: str, tokenizer, tokenizer_dir: str, template: str, data_cfg, max_samples: int = 0, log=print
) -> tuple[list[Example], DataStats]:
    """Collective when a process group exists: rank 0 tokenizes (or finds the cache), the others wait,
    then all load the same file. A UserError on rank 0 (a bad row) is passed to every rank, so no rank
    is left waiting for a cache that will never come."""
    import torch.distributed as dist

    from dist_glm.runtime.collectives import barrier, broadcast_object, is_main_process

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
