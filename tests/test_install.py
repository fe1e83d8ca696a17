"""What a user has after `make setup`, not what the repository root gives: the installed package imports
from anywhere, every console script runs from a directory outside the checkout, and the environment is
exactly the one constraints.txt pins (so CI tested what the README's commands install)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY_MODEL, child_env, read_metrics

BIN = Path(sys.executable).parent
COMMANDS = (
    "train",
    "prepare",
    "distill-cache",
    "distill-generate",
    "evaluate",
    "chat",
    "export",
    "serve",
    "doctor",
    "plot",
)


def outside(tmp_path, *cmd, timeout=300):
    """`cmd` run from a directory outside the checkout, with no PYTHONPATH leading back into it."""
    env = {k: v for k, v in child_env().items() if k != "PYTHONPATH"}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_the_package_imports_outside_the_repository(tmp_path):
    proc = outside(
        tmp_path,
        sys.executable,
        "-c",
        "import dist_glm, dist_glm.training.loop, dist_glm.models.artifacts; print(dist_glm.__file__)",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Path(proc.stdout.strip()) == REPO / "dist_glm" / "__init__.py"  # the editable install


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMANDS)
def test_every_console_script_runs_outside_the_repository(tmp_path, name):
    proc = outside(tmp_path, str(BIN / f"dist-glm-{name}"), "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:" if name != "doctor" else "dist_glm environment"), proc.stdout[:300]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_dist_glm_train_trains_from_another_directory(tmp_path, varlen_data):
    out = tmp_path / "run"
    flags = {
        "model_name_or_path": TINY_MODEL,
        "train_from_scratch": True,
        "dataset": varlen_data,
        "output_dir": out,
        "finetuning_type": "full",
        "cutoff_len": 64,
        "max_steps": 2,
        "logging_steps": 1,
        "save_steps": 0,
        "disable_tqdm": True,
        "plot_loss": True,
    }
    proc = outside(tmp_path, str(BIN / "dist-glm-train"), *[f"--{k}={v}" for k, v in flags.items()])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(read_metrics(out, "train/loss")) == [1, 2]
    # The one-line environment report is in every training log.
    assert "[dist_glm] environment: torch " in proc.stdout
    # No eval set: all_results.json is strict JSON (no Infinity for a best eval loss that never was).
    json.loads((out / "all_results.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    # metrics.jsonl records carry the wall clock; plot_loss drew the curve; TensorBoard has the config.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["time"] > 1.6e9 and r["elapsed_s"] >= 0 for r in records)
    assert (out / "training_loss.png").stat().st_size > 10_000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert "config/text_summary" in EventAccumulator(str(out / "runs")).Reload().Tags()["tensors"]
    # Noise a user cannot act on is gone (bitsandbytes' Hub-kernel fetch, PEFT's deprecated attribute).
    assert "kernels-community" not in proc.stderr and "is_gradient_checkpointing" not in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(
    bool(os.environ.get("DIST_GLM_LATEST")), reason="make test-latest runs on newer releases on purpose"
)
def test_the_environment_is_the_one_ci_tested(tmp_path):
    """make setup and .ci/run install with constraints.txt; the doctor reads the same file."""
    proc = outside(tmp_path, str(BIN / "dist-glm-doctor"))
    assert proc.returncode == 0, proc.stderr
    from dist_glm.runtime.doctor import version_rows

    untested = [(name, have, want) for name, have, want, ok in version_rows() if not ok]
    assert not untested, f"installed versions differ from constraints.txt: {untested}"
    assert "known problems: none" in proc.stdout, proc.stdout
