"""Reading local data files into chat messages: a list of {"role", "content"} per sample.

Formats: ChatGLM AdvertiseGen (`content` -> `summary`, column names configurable as in the ChatGLM-6B
scripts). Every bad row stops the run with `file:line: what is wrong`.
"""

import json
from pathlib import Path

from dist_glm.errors import UserError


def check_data_paths(spec: str, key: str) -> list[str]:
    problems = []
    for path in split_paths(spec):
        if not Path(path).is_file():
            problems.append(f"{key}: file '{path}' not found; give comma-separated paths to local json/jsonl files")
        elif Path(path).suffix not in (".json", ".jsonl"):
            problems.append(f"{key}: '{path}' is not a .json or .jsonl file")
    return problems


def split_paths(spec: str) -> list[str]:
    return [p.strip() for p in spec.split(",") if p.strip()]


def read_rows(path: str) -> list[tuple[int, dict]]:
    """(line number, row) pairs from a .jsonl file or a .json list."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 (byte {e.start}); re-save the file as UTF-8") from None
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of objects")
        rows = list(enumerate(data, start=1))
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    if not rows:
        raise UserError(f"{path}: no rows; the file is empty")
    return rows


def advertisegen_to_messages(row: dict, where: str, prompt_column: str, response_column: str) -> list[dict]:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for col in (prompt_column, response_column):
        if col not in row:
            raise UserError(f"{where}: missing field '{col}' (set prompt_column/response_column if yours differ)")
        if not isinstance(row[col], str):
            raise UserError(f"{where}: field '{col}' must be a string, got {type(row[col]).__name__}")
    return [{"role": "user", "content": row[prompt_column]}, {"role": "assistant", "content": row[response_column]}]


def load_conversations(spec: str, data_cfg) -> list[list[dict]]:
    """All samples from the comma-separated files in `spec`, in file order."""
    out = []
    for path in split_paths(spec):
        for lineno, row in read_rows(path):
            where = f"{path}:{lineno}"
            out.append(advertisegen_to_messages(row, where, data_cfg.prompt_column, data_cfg.response_column))
    return out
