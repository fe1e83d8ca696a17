"""User mistakes through the real entry script: one line per problem, exit code 2, no traceback,
and nothing already in output_dir is lost."""

import subprocess
import sys
from pathlib import Path

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


@pytest.mark.slow
def test_make_demo_gets_past_a_busy_port_and_a_busy_port_is_named(tmp_path):
    import socket

    from conftest import child_env

    with socket.socket() as busy:  # the deepspeed launcher's default port, held by "another job"
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            busy.bind(("127.0.0.1", 29500))
        except OSError:
            pass  # already held by something else: the same situation
        busy.listen()
        env = {k: v for k, v in child_env().items() if k != "MASTER_PORT"}
        # DEMO_ARGS without a YAML would start from the defaults: name the demo recipe with them.
        demo_args = f"configs/demo.yaml --max_steps=2 --eval_steps=0 --output_dir={tmp_path / 'demo'}"
        make = ["make", "demo", f"DEMO_ARGS={demo_args} --predict_with_generate=false --eval_on_start=false"]
        proc = subprocess.run(make, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert (tmp_path / "demo" / "model.safetensors").is_file()
        # The launcher's own chatter is not printed (the Makefile runs it --quiet, DS_ACCELERATOR=cpu without a GPU).
        chatter = ("Unable to find hostfile", "Setting accelerator to CPU", "WORLD INFO DICT")
        assert not [c for c in chatter if c in proc.stdout + proc.stderr], proc.stdout[-2000:] + proc.stderr[-2000:]

        deepspeed = str(Path(sys.executable).parent / "deepspeed")
        cmd = [deepspeed, "--master_port", "29500", "launch/train.py", "configs/demo.yaml", "--max_steps=1"]
        proc = subprocess.run(cmd + [f"--output_dir={tmp_path / 'x'}"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert proc.returncode != 0
        assert "port 29500 (MASTER_PORT) is already in use on this host" in proc.stderr, proc.stderr[-2000:]
