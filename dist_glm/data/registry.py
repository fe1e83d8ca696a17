"""Datasets by name, folder or pattern: what `dataset` / `eval_dataset` entries other than plain files
mean, resolved to files before anything reads them.

- a name in `dataset_dir/dataset_info.json`, LLaMA-Factory's registry, read unchanged: `file_name` (a
  file or a folder), `formatting` (`alpaca`, `sharegpt`), `columns` (prompt, query, response, system,
  history, messages, tools) and `tags` (role_tag, content_tag, user_tag, assistant_tag,
  observation_tag, function_tag, system_tag), plus dist_glm's own `enable_thinking` (the dataset's
  thinking switch, for mixed thinking / non-thinking data). Entries that need a download (`hf_hub_url`,
  `ms_hub_url`, `script_url`) are refused with the reason; a `ranking` entry (pairs) trains with stage=dpo and
  one with a `kto_tag` column with stage=kto only;
- a folder: every data file in it, sorted;
- a glob (`data/*.jsonl`): the matching files, sorted.

A registry entry's `file_name` must stay inside `dataset_dir` (symlinks followed): `../`, an absolute path
or a link out of it is refused, so that nothing (the token cache beside the data included) is read or
written outside the directory the user named. Name such a file directly in `dataset` instead.

A registry entry's column and tag mapping travels in `DataConfig.dataset_columns` (JSON, keyed by
file), so it is part of the tokenization cache key and the converters see rows in their own shape.
"""

import glob
import json
from pathlib import Path

from dist_glm.data.sources import SUFFIXES, named_sets, split_paths
from dist_glm.errors import UserError

REGISTRY = "dataset_info.json"
_REMOTE = ("hf_hub_url", "ms_hub_url", "script_url", "om_hub_url")


def _files_in(folder: Path) -> list[str]:
    return sorted(str(f) for f in folder.iterdir() if f.is_file() and f.suffix in SUFFIXES)


def _registry(dataset_dir: str) -> dict | None:
    path = Path(dataset_dir or ".") / REGISTRY
    if not path.is_file():
        return None
    try:
        registry = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); fix the registry") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to read; a registry is an object of flat entries") from None
    if not isinstance(registry, dict):
        raise UserError(
            f"{path}: the top level is a JSON {_kind(registry)}; a registry is an object mapping each dataset "
            'name to its entry, e.g. {"my_data": {"file_name": "my_data.json"}}'
        )
    return registry


def _kind(value) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _check_entry(entry, where: str) -> None:
    """The shape LLaMA-Factory's registry entries have, checked before any field is used."""
    if not isinstance(entry, dict):
        raise UserError(f'{where} is a JSON {_kind(entry)}; an entry is an object such as {{"file_name": "x.json"}}')
    if "file_name" in entry and not (isinstance(entry["file_name"], str) and entry["file_name"].strip()):
        raise UserError(
            f"{where}: file_name is {json.dumps(entry['file_name'])}; give the data file (or folder) it names"
        )
    for field in ("columns", "tags"):
        value = entry.get(field, {})
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise UserError(
                f"{where}: {field} must be an object of names to column names (strings), "
                f'e.g. {{"prompt": "instruction"}}; found a JSON {_kind(value)}'
            )
    if not isinstance(entry.get("enable_thinking", True), bool):
        raise UserError(f"{where}: enable_thinking must be true or false (the dataset's thinking switch)")
    if not isinstance(entry.get("formatting", "alpaca"), str):
        raise UserError(f'{where}: formatting must be "alpaca" or "sharegpt"')


def _from_registry(name: str, entry: dict, dataset_dir: str, key: str) -> tuple[list[str], dict]:
    where = f"{key}: '{name}' ({Path(dataset_dir or '.') / REGISTRY})"
    _check_entry(entry, where)
    remote = [k for k in _REMOTE if k in entry]
    if remote:
        raise UserError(
            f"{where} is a {remote[0]} entry; nothing is downloaded here: download it and register file_name"
        )
    if "file_name" not in entry:
        raise UserError(f"{where} has no file_name; give the data file (or folder) it names")
    root = Path(dataset_dir or ".")
    target = root / entry["file_name"]
    if not target.resolve().is_relative_to(root.resolve()):
        raise UserError(
            f"{where}: file_name '{entry['file_name']}' leads outside dataset_dir '{root}'; move the file under "
            "dataset_dir, or name it directly in dataset"
        )
    if target.is_dir() and not _files_in(target):
        raise UserError(
            f"{where}: file_name names the folder '{target}', which holds no data files ({', '.join(SUFFIXES)})"
        )
    files = _files_in(target) if target.is_dir() else [str(target)]
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise UserError(f"{where}: formatting '{formatting}' is not one of alpaca, sharegpt")
    mapping = {"formatting": formatting, "columns": entry.get("columns", {}), "tags": entry.get("tags", {})}
    if entry.get("ranking"):  # preference pairs: read by dist_glm.data.preference (stage=dpo) only
        mapping["ranking"] = True
    if "enable_thinking" in entry:  # dist_glm's own key: mixed thinking / non-thinking data, one switch per dataset
        mapping["enable_thinking"] = entry["enable_thinking"]
    return files, mapping


def expand(spec: str, dataset_dir: str, key: str) -> tuple[str, dict[str, dict]]:
    """(comma-separated files, {file: registry mapping}) for one `dataset`-style value."""
    registry = None
    files, mappings = [], {}
    for item in split_paths(spec):
        p = Path(item)
        if p.is_file():
            files.append(item)
        elif p.is_dir():
            inside = _files_in(p)
            if not inside:
                raise UserError(f"{key}: folder '{item}' holds no data files ({', '.join(SUFFIXES)})")
            files += inside
        elif any(c in item for c in "*?["):
            matched = sorted(f for f in glob.glob(item) if Path(f).suffix in SUFFIXES)
            if not matched:
                raise UserError(f"{key}: the pattern '{item}' matches no data files")
            files += matched
        else:
            registry = registry if registry is not None else (_registry(dataset_dir) or {})
            if item not in registry:
                # Left as given: the file checks say it is not found (with the registry hint).
                files.append(item)
                continue
            found, mapping = _from_registry(item, registry[item], dataset_dir, key)
            files += found
            add_mappings(mappings, {f: mapping for f in found}, key)
    return ",".join(files), mappings


def add_mappings(mappings: dict, more: dict, key: str) -> None:
    """Registry mappings are kept per file: two entries reading one file must read it the same way, or one
    of them would silently get the other's columns or thinking switch."""
    for path, mapping in more.items():
        if mappings.get(path, mapping) != mapping:
            raise UserError(
                f"{key}: two dataset_info.json entries read '{path}' with different settings "
                f"({json.dumps(mappings[path])} and {json.dumps(mapping)}); give each its own file (a copy)"
            )
        mappings[path] = mapping


def resolve_and_check(data_cfg, eval_data: bool = True) -> list[str]:
    """`resolve`, then the files it gave checked; when resolving failed, its problems alone (checking the
    unresolved names would only add a second, misleading line for the same mistake)."""
    from dist_glm.data.sources import check_data_paths

    problems = resolve(data_cfg)
    if problems:
        return problems
    problems = check_data_paths(data_cfg.dataset, "dataset")
    if eval_data:
        problems += check_data_paths(data_cfg.eval_dataset, "eval_dataset", named=True)
    return problems


def resolve(data_cfg) -> list[str]:
    """Expand `dataset` and `eval_dataset` (named sets too) in place; returns problems, one line each."""
    try:
        files, mappings = expand(data_cfg.dataset, data_cfg.dataset_dir, "dataset")
        entries = []
        for name, value in named_sets(data_cfg.eval_dataset).items():
            eval_files, more = expand(value, data_cfg.dataset_dir, "eval_dataset")
            add_mappings(mappings, more, "eval_dataset")
            entries += [f"{name}={f}" if name else f for f in split_paths(eval_files)]
    except UserError as e:
        return e.problems
    data_cfg.dataset, data_cfg.eval_dataset = files, ",".join(entries)
    if mappings:
        data_cfg.dataset_columns = json.dumps(mappings, sort_keys=True, ensure_ascii=False)
    return []


def check_stage(data_cfg, stage: str) -> list[str]:
    """A ranking dataset (`"ranking": true`, preference pairs) trains with stage=dpo only, and one with a
    `kto_tag` column (answers labelled desirable or not) with stage=kto only: read otherwise, its answers would be
    trained as something they are not."""
    registered = json.loads(getattr(data_cfg, "dataset_columns", "") or "{}")
    ranking = [f for f, m in registered.items() if m.get("ranking")]
    if ranking and stage != "dpo":
        return [
            f"dataset: {ranking[0]} is registered as a ranking (preference) dataset in dataset_info.json; train it "
            "with stage: dpo, or register another dataset"
        ]
    tagged = [f for f, m in registered.items() if "kto_tag" in m.get("columns", {})]
    if tagged and stage != "kto":
        return [
            f"dataset: {tagged[0]} is registered with a kto_tag column (answers labelled desirable or not) in "
            "dataset_info.json; train it with stage: kto, or register another dataset"
        ]
    return []
