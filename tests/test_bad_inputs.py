"""Inputs a careless or hostile user gives, each once a traceback or a silent wrong result, now one line
naming the file or field and the fix: corrupt checkpoint files (skipped by `auto` like truncated ones),
a config.json that disagrees with its weights, an adapter on another base, a teacher fine-tuned with
another chat template, a bad distill-cache manifest, and planner inputs of the wrong type or absurd size."""

import json
import shutil
import time
from pathlib import Path

import pytest

from dist_glm.checkpointing.checkpoints import OURS_FILE, STATE_FILE, resolve_resume_path
from dist_glm.config import load_config, save_config
from dist_glm.errors import UserError
from tests.conftest import REPO, TINY_MODEL

TINY_0414 = REPO / "assets" / "tiny-glm4-0414"
STUDENT = REPO / "assets" / "tiny-glm4-student"


def saved(path: Path, assets: Path = TINY_MODEL) -> Path:
    """A model directory as a user has it: random weights, config and tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(assets)).save_pretrained(path)
    for f in assets.iterdir():
        if f.name != "config.json":
            shutil.copy(f, path / f.name)
    return path


# ---------------------------------------------------------------- checkpoints


def checkpoint(out: Path, step: int, state=None, manifest=None) -> Path:
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / OURS_FILE).write_text("")  # written by dist_glm
    state = {"global_step": step, "world_size": 1, "global_batch": 4, "total_steps": 10} if state is None else state
    (path / STATE_FILE).write_text(state if isinstance(state, str) else json.dumps(state))
    if manifest is not None:
        (path / "manifest.json").write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize(
    "state, manifest, reason",
    [
        ("\x00garbage of the same size as a real state file\x00", None, "not valid JSON"),
        ({"global_step": "abc"}, None, "global_step is 'abc'"),
        ({"global_step": 4, "recent_losses": "x"}, None, "recent_losses is 'x'"),
        ({"global_step": 4, "world_size": -2}, None, "world_size is -2"),
        ([4], None, "not a JSON object"),
        (None, [], "manifest.json is unreadable"),
        (None, {"files": [1, 2]}, "manifest.json is unreadable"),
        (None, {"files": {"a": "big"}}, "manifest.json is unreadable"),
    ],
)
def test_a_corrupt_newest_checkpoint_is_skipped_by_auto_and_refused_by_name(tmp_path, state, manifest, reason):
    good = checkpoint(tmp_path, 2)
    bad = checkpoint(tmp_path, 4, state=state, manifest=manifest)
    warnings = []
    assert resolve_resume_path("auto", str(tmp_path), warn=warnings.append) == good
    (warning,) = warnings
    assert warning.startswith("WARNING: skipping damaged checkpoint checkpoint-4") and reason in warning, warning
    with pytest.raises(UserError, match=f"resume_from_checkpoint='{bad}' is damaged"):
        resolve_resume_path(str(bad), str(tmp_path))


# ---------------------------------------------------------------- models that do not fit


def test_a_config_json_that_disagrees_with_its_weights_is_one_line(tmp_path):
    from dist_glm.config import ModelConfig
    from dist_glm.models.artifacts import load_for_inference
    from dist_glm.models.loading import load_model

    model = saved(tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] += 8  # edited by hand
    (model / "config.json").write_text(json.dumps(config))
    expect = (
        rf"model_name_or_path='{model}': its config.json does not fit its weights \(\S+ is "
        r"\[714, 128\] in model.safetensors but \[722, 128\] by config.json\); use the config.json"
    )
    with pytest.raises(UserError, match=expect):  # the tools and a teacher load this way
        load_for_inference(str(model))
    import torch

    with pytest.raises(UserError, match=expect):  # training
        load_model(ModelConfig(model_name_or_path=str(model)), {}, torch.float32, seed=0)


def lora_adapter(base: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(out)
    return out


def test_an_adapter_on_a_base_of_another_architecture_is_refused(tmp_path):
    from dist_glm.models.artifacts import resolve_artifact

    glm4 = saved(tmp_path / "glm4")
    adapter = lora_adapter(glm4, tmp_path / "adapter")
    glm4_0414 = saved(tmp_path / "glm4_0414", TINY_0414)  # the same shapes: PEFT would merge it silently
    with pytest.raises(UserError, match=r"was trained on '.*glm4' \(model_type glm, GlmForCausalLM\) but "):
        resolve_artifact(str(glm4_0414), str(adapter))
    assert resolve_artifact(str(glm4), str(adapter)).adapter == adapter


def test_an_adapter_on_a_base_of_other_shapes_is_one_line(tmp_path):
    from dist_glm.models.artifacts import load_for_inference

    adapter = lora_adapter(saved(tmp_path / "glm4"), tmp_path / "adapter")
    other = saved(tmp_path / "other", STUDENT)  # the same architecture, other sizes
    (adapter / "adapter_config.json").write_text(
        json.dumps({**json.loads((adapter / "adapter_config.json").read_text()), "base_model_name_or_path": ""})
    )
    with pytest.raises(UserError, match=rf"adapter_name_or_path='{adapter}' does not fit the base .*size mismatch"):
        load_for_inference(str(other), str(adapter))


def test_a_teacher_fine_tuned_with_another_chat_template_is_refused(tmp_path):
    from dist_glm.objectives.teacher import check_teacher

    teacher = saved(tmp_path / "teacher")
    recipe = load_config(
        [f"--model_name_or_path={TINY_MODEL}", "--dataset=d", "--output_dir=o", "--template=glm4_0414"]
    )
    save_config(recipe, teacher / "config.yaml")  # what a dist_glm run leaves beside its model
    student = [f"--model_name_or_path={TINY_MODEL}", "--dataset=d", "--output_dir=o"]
    problems, _ = check_teacher(load_config([*student, f"--teacher_model_name_or_path={teacher}"], None))
    (problem,) = problems  # identical tokenizer files, other prompts
    assert "fine-tuned with template glm4_0414 (its config.yaml) and the student trains with glm4" in problem
    same = [*student, "--template=glm4_0414", f"--teacher_model_name_or_path={teacher}"]
    assert check_teacher(load_config(same, None))[0] == []


# ---------------------------------------------------------------- distillation cache, planner


@pytest.mark.parametrize("text", ["not json", "[]", '{"top_k": "8"}'])
def test_a_bad_distill_cache_manifest_is_one_line(tmp_path, text):
    from dist_glm.objectives.cached_distillation import read_manifest

    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(UserError, match=rf"distill_cache='{tmp_path}': manifest.json .*rebuild the cache"):
        read_manifest(str(tmp_path))


def plan(capsys, *args: str) -> tuple[int, str]:
    from dist_glm.cli import plan_main

    with pytest.raises(SystemExit) as code:
        plan_main(["configs/demo.yaml", *args])
    return code.value.code, capsys.readouterr().err


def config_dir(tmp_path: Path, **changes) -> Path:
    d = tmp_path / "cfg"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**json.loads((TINY_MODEL / "config.json").read_text()), **changes}))
    return d


def test_the_planner_refuses_a_config_json_of_wrong_types(tmp_path, capsys):
    code, err = plan(capsys, f"--model_name_or_path={config_dir(tmp_path, num_hidden_layers='two')}")
    assert code == 2 and err.count("\n") == 1 and 'num_hidden_layers="two" must be a positive whole number' in err


def test_the_planner_answers_an_absurd_config_at_once(tmp_path, capsys):
    absurd = config_dir(tmp_path, num_hidden_layers=10**4, vocab_size=10**12, hidden_size=10**6)
    start = time.monotonic()
    code, err = plan(capsys, f"--model_name_or_path={absurd}")
    assert code == 2 and err.count("\n") == 3 and "beyond any real model" in err
    assert time.monotonic() - start < 30  # it built nothing (it once printed nothing for 240 s)


@pytest.mark.parametrize("value", ["inf", "nan", "0"])
def test_the_planner_refuses_a_gpu_memory_that_is_not_one(capsys, value):
    code, err = plan(capsys, f"--gpu_memory_gb={value}")
    assert code == 2 and f"gpu_memory_gb={float(value)} must be a GPU's memory in GiB" in err
