"""LLaMA-Factory's dataset_info.json as a careless or hostile user writes it: every shape mistake is one
line naming the file, the entry and the fix (no TypeError, AttributeError, RecursionError or IndexError),
never followed by a second misleading line; file_name may not lead outside dataset_dir; a mapped column
the data lacks is named as the user named it."""

import json
from pathlib import Path

import pytest

from dist_glm.config import load_config
from dist_glm.data.converters import load_conversations
from dist_glm.data.registry import resolve_and_check
from dist_glm.errors import UserError

ROW = {"instruction": "类型#裙", "output": "红色"}


def registry_dir(tmp_path: Path, registry) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "rows.json").write_text(json.dumps([ROW], ensure_ascii=False))
    text = registry if isinstance(registry, str) else json.dumps(registry)
    (d / "dataset_info.json").write_text(text)
    return d


def problems_for(tmp_path, registry, name="x") -> list[str]:
    d = registry_dir(tmp_path, registry)
    cfg = load_config([f"--dataset={name}", f"--dataset_dir={d}", "--model_name_or_path=m", "--output_dir=o"], None)
    return resolve_and_check(cfg.data)


@pytest.mark.parametrize(
    "registry, expect",
    [
        (["x"], "the top level is a JSON list; a registry is an object mapping each dataset name"),
        ("x", None),  # not JSON at all: the JSON error
        (5, "the top level is a JSON number"),
        ({"x": "rows.json"}, "'x' (" and "is a JSON string; an entry is an object"),
        ({"x": ["rows.json"]}, "is a JSON list; an entry is an object"),
        ({"x": {"file_name": 5}}, "file_name is 5; give the data file"),
        ({"x": {"file_name": None}}, "file_name is null; give the data file"),
        ({"x": {"file_name": ""}}, 'file_name is ""; give the data file'),
        ({"x": {"file_name": "rows.json", "columns": ["prompt"]}}, "columns must be an object of names"),
        ({"x": {"file_name": "rows.json", "tags": "from"}}, "tags must be an object of names"),
    ],
)
def test_a_registry_of_the_wrong_shape_is_one_line(tmp_path, registry, expect):
    if registry == "x":
        registry, expect = "x", "not valid JSON"
    problems = problems_for(tmp_path, registry)
    assert len(problems) == 1, problems  # and no second "'x' is not a file, folder, ..." line
    assert "dataset_info.json" in problems[0] and expect in problems[0], problems


def test_a_deeply_nested_registry_is_one_line(tmp_path):
    (problem,) = problems_for(tmp_path, "[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in problem


def test_a_file_name_naming_an_empty_folder_is_one_line(tmp_path):
    d = registry_dir(tmp_path, {"x": {"file_name": "empty"}})
    (d / "empty").mkdir()
    cfg = load_config(["--dataset=x", f"--dataset_dir={d}", "--model_name_or_path=m", "--output_dir=o"], None)
    (problem,) = resolve_and_check(cfg.data)
    assert "names the folder" in problem and "holds no data files" in problem


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_file_name_may_not_lead_outside_dataset_dir(tmp_path, how):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "rows.json").write_text(json.dumps([ROW]))
    name = {"dotdot": "../elsewhere/rows.json", "absolute": str(outside / "rows.json"), "symlink": "link.json"}[how]
    d = registry_dir(tmp_path, {"x": {"file_name": name}})
    if how == "symlink":
        (d / "link.json").symlink_to(outside / "rows.json")
    cfg = load_config(["--dataset=x", f"--dataset_dir={d}", "--model_name_or_path=m", "--output_dir=o"], None)
    (problem,) = resolve_and_check(cfg.data)
    assert f"file_name '{name}' leads outside dataset_dir" in problem
    assert not (outside / ".dist_glm_cache").exists()


def test_a_mapped_column_the_file_lacks_is_named_as_the_user_named_it(tmp_path):
    d = registry_dir(
        tmp_path, {"x": {"file_name": "rows.json", "columns": {"prompt": "question", "response": "output"}}}
    )
    cfg = load_config(["--dataset=x", f"--dataset_dir={d}", "--model_name_or_path=m", "--output_dir=o"], None)
    assert resolve_and_check(cfg.data) == []
    with pytest.raises(
        UserError, match=r"rows.json:1: missing column 'question' \(columns.prompt in dataset_info.json\)"
    ):
        load_conversations(cfg.data.dataset, cfg.data, [])
