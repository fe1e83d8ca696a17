"""Where rows come from: dataset specs (comma lists, `name=path` eval sets), their checks, and reading
rows with line numbers from .json, .jsonl, .csv, .parquet and .txt files."""

import json
import re
from pathlib import Path

from dist_glm.errors import UserError

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")


class BadRow(ValueError):
    """One row that cannot be used; carries `where` (file:line) and what is wrong."""


def split_paths(spec: str) -> list[str]:
    return [p.strip() for p in spec.split(",") if p.strip()]


_SET_NAME = re.compile(r"^([A-Za-z0-9_-]+)=(.+)$")


def named_sets(spec: str, key: str = "eval_dataset") -> dict[str, str]:
    """`a.jsonl,b.jsonl` -> {"": "a.jsonl,b.jsonl"} (one set); `new=a.jsonl,old=b.jsonl` -> one set per
    name, logged as eval/new/..., eval/old/... (a name given twice joins its files). Mixing named and
    unnamed entries raises UserError."""
    entries = split_paths(spec)
    named = [_SET_NAME.match(e) for e in entries]
    if not any(named):
        return {"": ",".join(entries)} if entries else {}
    if not all(named):
        bare = next(e for e, m in zip(entries, named, strict=True) if not m)
        raise UserError(f"{key}: '{bare}' has no name while others do; write every set as NAME=FILE (e.g. old={bare})")
    sets: dict[str, list[str]] = {}
    for m in named:
        sets.setdefault(m.group(1), []).append(m.group(2).strip())
    return {name: ",".join(paths) for name, paths in sets.items()}


def check_data_paths(spec: str, key: str, named: bool = False) -> list[str]:
    """Every file `spec` names exists and has a data suffix; `named`: entries may be NAME=FILE."""
    if named:
        try:
            spec = ",".join(named_sets(spec, key).values())
        except UserError as e:
            return e.problems
    problems = []
    for path in split_paths(spec):
        if Path(path).is_dir():
            inside = sorted(str(f) for f in Path(path).iterdir() if f.suffix in SUFFIXES)[:2]
            example = f" (e.g. {','.join(inside)})" if inside else ""
            problems.append(f"{key}: '{path}' is a directory; give the data files in it, comma-separated{example}")
        elif not Path(path).is_file() and not Path(path).suffix:
            problems.append(
                f"{key}: '{path}' is not a file, folder, pattern or a name in dataset_dir's dataset_info.json; give "
                "local data files, a folder or a glob, or set dataset_dir to the folder of your dataset_info.json"
            )
        elif not Path(path).is_file():
            problems.append(f"{key}: file '{path}' not found; give comma-separated paths to local data files")
        elif Path(path).suffix not in SUFFIXES:
            problems.append(f"{key}: '{path}' has an unsupported extension; use one of {', '.join(SUFFIXES)}")
    return problems


def read_rows(path: str) -> list[tuple[int, object]]:
    """(line or row number, row) pairs. A file-level problem (not UTF-8, empty) raises UserError;
    a bad JSON line is returned as a BadRow in place of its row, so `on_invalid: skip` can skip it."""
    suffix = Path(path).suffix
    if suffix in (".csv", ".parquet"):
        return _read_with_datasets(path, suffix)
    raw = Path(path).read_bytes()
    if suffix == ".json":
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise UserError(
                f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}); re-save the file as UTF-8"
            ) from None
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); fix the file") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of objects; use .jsonl for one object per line")
        rows = list(enumerate(data, start=1))
    else:
        # Line by line, so one bad line (bad JSON, bad bytes) is one bad row that `skip` can skip.
        rows = []
        for lineno, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
                rows.append((lineno, {"text": text.rstrip("\r")} if suffix == ".txt" else json.loads(text)))
            except UnicodeDecodeError as e:
                rows.append((lineno, BadRow(f"not UTF-8 (byte 0x{line[e.start]:02x}); re-save the file as UTF-8")))
            except json.JSONDecodeError as e:
                rows.append((lineno, BadRow(f"invalid JSON ({e.msg})")))
    if not rows:
        raise UserError(f"{path}: the file has no rows")
    return rows


def _read_with_datasets(path: str, suffix: str) -> list[tuple[int, object]]:
    from datasets import load_dataset

    try:
        ds = load_dataset(suffix[1:], data_files=path, split="train")
    except Exception as e:  # datasets raises many types for a malformed file; all mean "cannot read it"
        raise UserError(f"{path}: cannot read as {suffix[1:]} ({str(e).splitlines()[0][:200]})") from None
    if len(ds) == 0:
        raise UserError(f"{path}: the file has no rows")
    first = 2 if suffix == ".csv" else 1  # a csv's line 1 is its header
    return [(i + first, row) for i, row in enumerate(ds)]
