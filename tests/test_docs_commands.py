"""The one-line command per method in docs/methods.md works as written (fewer steps, the demo's trained
model replaced by the session's pretrained tiny GLM, output into a temporary directory)."""

import re
import shlex

import pytest

from conftest import REPO, read_metrics, run_train

START, END = "<!-- method-commands:start -->", "<!-- method-commands:end -->"
ARTIFACT = {"full": "model.safetensors", "freeze": "model.safetensors"}


def documented_commands() -> list[list[str]]:
    text = (REPO / "docs" / "methods.md").read_text(encoding="utf-8")
    block = re.search(re.escape(START) + "(.*?)" + re.escape(END), text, re.S).group(1)
    return [shlex.split(line) for line in block.splitlines() if line.startswith("python launch/train.py")]


def method_of(args: list[str]) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith("--finetuning_type="))


def test_every_method_has_its_line():
    assert [method_of(cmd) for cmd in documented_commands()] == ["full", "freeze", "lora", "qlora", "ptuning"]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(5), ids=["full", "freeze", "lora", "qlora", "ptuning"])
def test_documented_method_command_runs(index, tmp_path, pretrained_tiny):
    cmd = documented_commands()[index]
    assert cmd[:2] == ["python", "launch/train.py"]
    args = []
    for arg in cmd[2:]:
        key = arg.split("=", 1)[0]
        if key == "--model_name_or_path":
            arg = f"--model_name_or_path={pretrained_tiny}"
        elif key == "--output_dir":
            arg = f"--output_dir={tmp_path / 'out'}"
        elif key == "--max_steps":
            arg = "--max_steps=3"
        args.append(arg)
    args += ["--eval_on_start=false", "--predict_with_generate=false", "--save_steps=0", "--disable_tqdm"]
    run_train(args, nprocs=None)
    out = tmp_path / "out"
    assert (out / ARTIFACT.get(method_of(args), "adapter_model.safetensors")).is_file()
    assert sorted(read_metrics(out, "eval/loss")) == [3]  # the final eval ran after the export
