"""User mistakes through the real entry script: one line per problem, exit code 2, no traceback,
and nothing already in output_dir is lost."""

import subprocess
import sys

import pytest

from conftest import REPO, TINY_MODEL, run_script, run_train

GOOD = ["--model_name_or_path=" + str(TINY_MODEL), "--train_from_scratch", "--dataset=data/advertisegen_demo/dev.jsonl"]

pytestmark = pytest.mark.slow  # every test here starts processes


def run(args, tmp_path):
    return run_script("train.py", args)


@pytest.mark.parametrize(
    "make_args,expect",
    [
        (
            lambda d: [
                "--model_name_or_path=/no/such/model",
                "--dataset=data/advertisegen_demo/dev.jsonl",
                f"--output_dir={d}",
            ],
            "model_name_or_path='/no/such/model': no config.json there",
        ),
        (
            lambda d: GOOD[:2] + ["--dataset=missing.jsonl", f"--output_dir={d}"],
            "dataset: file 'missing.jsonl' not found",
        ),
        (lambda d: [str(d / "broken.yaml")], "broken.yaml:3: not valid YAML"),
        (lambda d: GOOD + [f"--output_dir={d}", f"--deepspeed={d / 'broken.json'}"], "broken.json': not valid JSON"),
        (
            lambda d: GOOD + [f"--output_dir={d}", f"--deepspeed={d / 'tbs.json'}"],
            "train_batch_size=7 contradicts the training config",
        ),
        (
            lambda d: GOOD + [f"--output_dir={d}", "--per_device_train_batch_size=65"],
            "dataset has 64 samples, fewer than one global batch of 65",
        ),
        (lambda d: GOOD + [f"--output_dir={d}", "--lerning_rate=1"], "did you mean 'learning_rate'"),
        (lambda d: GOOD + [f"--output_dir={d}", f"--dataset={d / 'rows.jsonl'}"], "rows.jsonl:2: invalid JSON"),
    ],
)
def test_user_errors_exit_2_with_one_line_each(tmp_path, make_args, expect):
    (tmp_path / "broken.yaml").write_text("a: 1\nb: [\n")
    (tmp_path / "broken.json").write_text("{nope")
    (tmp_path / "tbs.json").write_text('{"train_batch_size": 7}')
    (tmp_path / "rows.jsonl").write_text('{"content": "a", "summary": "b"}\n{"content": \n')
    proc = run(make_args(tmp_path), tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("train.py: error:")]
    assert any(expect in ln for ln in errors), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_help_exits_0():
    proc = subprocess.run([sys.executable, "launch/train.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and "--per_device_train_batch_size" in proc.stdout


@pytest.mark.slow
def test_existing_checkpoints_are_never_overwritten_silently(tmp_path, varlen_data):
    from conftest import base_args

    run_train(base_args(tmp_path, varlen_data, max_steps=2, save_steps=2), nprocs=None)
    proc = run(base_args(tmp_path, varlen_data, max_steps=2, save_steps=2), tmp_path)
    assert proc.returncode == 2 and "already holds checkpoint-2" in proc.stderr
    assert "--resume_from_checkpoint=auto" in proc.stderr
    assert (tmp_path / "checkpoint-2" / "trainer_state.json").is_file()
