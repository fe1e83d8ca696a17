"""Shared helpers: real training processes launched the way users launch them, on CPU (gloo)."""

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Tests import this file as `conftest` or as `tests.conftest`: one module under both names, so its state
# (the Popen guard, the not-exercised list) exists once.
sys.modules.setdefault("conftest", sys.modules[__name__])
sys.modules.setdefault("tests.conftest", sys.modules[__name__])

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = REPO / "assets" / "tiny-glm4"


# ---------------------------------------------------------------- honest tiers
# A test that starts one of the project's processes (training ranks, a tool, the server, a launcher) is
# marked slow; `make test-fast` (-m "not slow") starts none. Enforced: outside a slow test, starting a
# Python interpreter or a launcher fails the test with the fix. pytest_runtest_setup runs before the
# test's fixtures, so a module fixture that trains is caught too.
_LAUNCHERS = ("python", "deepspeed", "torchrun", "mpirun", "srun", "sbatch")
_in_slow_test = True  # outside any test (collection, session start) processes are allowed
_real_popen_init = subprocess.Popen.__init__


def pytest_runtest_setup(item):
    global _in_slow_test
    _in_slow_test = item.get_closest_marker("slow") is not None


def _popen_init(self, args, *rest, **kwargs):
    program = Path(str(args[0] if isinstance(args, (list, tuple)) else str(args).split()[0])).name
    if not _in_slow_test and program.startswith(_LAUNCHERS):
        raise AssertionError(f"this test starts a process ({program}); mark it @pytest.mark.slow")
    _real_popen_init(self, args, *rest, **kwargs)


subprocess.Popen.__init__ = _popen_init


# ---------------------------------------------------------------- what this run could not exercise
# A feature whose test can only check its refusal here (no CUDA GPU, a package CI does not install) is
# named at the end of the report, so a green run never reads as "everything was tested". Tests call
# `not_exercised` in their refusal branch; a skip whose reason starts with NOT_EXERCISED counts too.
NOT_EXERCISED = "not exercised here: "
_not_exercised: dict[str, str] = {}


def not_exercised(feature: str, why: str) -> None:
    _not_exercised[feature] = why


def pytest_terminal_summary(terminalreporter):
    for report in terminalreporter.stats.get("skipped", []):
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
        reason = reason.removeprefix("Skipped: ")
        if reason.startswith(NOT_EXERCISED):
            feature, _, why = reason.removeprefix(NOT_EXERCISED).partition(": ")
            _not_exercised.setdefault(feature, why)
    if _not_exercised:
        terminalreporter.section("features this run did not exercise (GPU ones: launch/gpu_check.py)")
        for feature, why in sorted(_not_exercised.items()):
            terminalreporter.write_line(f"{feature}: {why}")


_ops_built = False


def build_ops_once() -> None:
    """DeepSpeed's JIT ops, built once per session, alone, before the first test process needs them, so
    no multi-rank test compiles inside its time limit (seconds when already built; dist_glm/runtime/ops.py).
    Only sessions that start processes pay for it."""
    global _ops_built
    if not _ops_built:
        _ops_built = True
        env = dict(os.environ, DS_ACCELERATOR="cpu")
        subprocess.run([sys.executable, "-m", "dist_glm.runtime.ops"], cwd=REPO, env=env, check=True, timeout=1800)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict:
    """The environment of every process a test starts (and the moment to make sure the ops exist)."""
    build_ops_once()
    env = dict(
        os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1"
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def launch_cmd(nprocs: int | None) -> list[str]:
    """nprocs=None: plain `python launch/train.py` (a world of one, no launcher)."""
    script = str(REPO / "launch" / "train.py")
    if nprocs is None:
        return [sys.executable, script]
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    return [deepspeed, "--num_gpus", str(nprocs), "--master_port", str(_free_port()), script]


def run_train(args: list[str], nprocs: int | None = 1, timeout: int = 600, check: bool = True, launcher: str = "env"):
    """Train in real processes. nprocs=None: plain `python launch/train.py`. Otherwise `nprocs` ranks,
    started by default the way srun (slurm/common.sh) and torchrun start them: one process per rank
    with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in its environment. launcher="deepspeed" goes
    through the deepspeed launcher instead (the demo, preemption and resume tests do too); it costs
    two extra Python start-ups per run, which across the suite is minutes of CI."""
    if nprocs is None or launcher == "deepspeed":
        proc = subprocess.run(
            launch_cmd(nprocs) + args, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout
        )
    else:
        proc = run_ranks(args, nprocs, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def run_ranks(args: list[str], nprocs: int, timeout: int) -> subprocess.CompletedProcess:
    """`nprocs` rank processes; like a launcher, the first failure terminates the others. Returns rank
    0's stdout, every rank's stderr, and the first non-zero exit code (0 when all succeed)."""
    import tempfile
    import time

    port = str(_free_port())
    procs, files = [], []
    for rank in range(nprocs):
        env = dict(child_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        files.append((out, err))
        cmd = [sys.executable, str(REPO / "launch" / "train.py"), *args]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, text=True))
    deadline, timed_out = time.monotonic() + timeout, False
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.1)
        rc = next((p.returncode for p in procs if p.returncode not in (None, 0)), 0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = []
    for out, err in files:
        out.seek(0), err.seek(0)
        texts.append((out.read(), err.read()))
        out.close(), err.close()
    if timed_out:
        raise subprocess.TimeoutExpired(cmd, timeout, output=texts[0][0], stderr="".join(e for _, e in texts))
    return subprocess.CompletedProcess(cmd, rc, stdout=texts[0][0], stderr="".join(e for _, e in texts))


def run_script(script: str, args: list[str], timeout: int = 300):
    """A launch/ script as a plain single process (no launcher), output captured."""
    return subprocess.run(
        [sys.executable, f"launch/{script}", *args],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_one_and_two_ranks(tmp_path: Path, data: Path, ds_config: str, **settings):
    """The same global batch of 4 on one process and on 2 ranks x micro-batch 2 under `ds_config`.
    Returns (dir_one, dir_two, losses_one, losses_two, stdout_one)."""
    one, two = tmp_path / "one", tmp_path / "two"
    proc = run_train(base_args(one, data, per_device_train_batch_size=4, **settings), nprocs=None)
    run_train(
        base_args(two, data, per_device_train_batch_size=2, deepspeed=f"ds_configs/{ds_config}.json", **settings),
        nprocs=2,
    )
    return one, two, read_metrics(one, "train/loss"), read_metrics(two, "train/loss"), proc.stdout


def read_metrics(output_dir: Path, key: str) -> dict[int, float]:
    out = {}
    for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if key in rec:
            out[rec["step"]] = rec[key]
    return out


def base_args(output_dir: Path, data: Path, **overrides) -> list[str]:
    """A small full fine-tuning run of the tiny GLM; overrides win."""
    args = {
        "model_name_or_path": TINY_MODEL,
        "train_from_scratch": True,
        "dataset": data,
        "output_dir": output_dir,
        "finetuning_type": "full",
        "cutoff_len": 96,
        "learning_rate": 2e-3,
        "max_steps": 10,
        "logging_steps": 1,
        "save_steps": 0,
        "warmup_steps": 2,
        "weight_decay": 0.01,
        "disable_tqdm": True,
        "per_device_train_batch_size": 4,
        "seed": 7,
    }
    args.update(overrides)
    return [f"--{k}={v}" for k, v in args.items()]


@pytest.fixture(scope="session")
def pretrained_tiny(tmp_path_factory) -> Path:
    """The tiny GLM saved as a checkpoint on disk (seeded random weights + the shipped tokenizer): what
    QLoRA quantizes and what adapters are applied to."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pretrained") / "tiny-glm4"
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_MODEL)).save_pretrained(path)
    for f in TINY_MODEL.iterdir():
        if f.name != "config.json":
            (path / f.name).write_bytes(f.read_bytes())
    return path


@pytest.fixture(scope="session")
def eval_data(tmp_path_factory) -> Path:
    """The first 8 held-out demo rows: a small eval set for eval loss and generation metrics."""
    rows = (REPO / "data" / "advertisegen_demo" / "dev.jsonl").read_text(encoding="utf-8").splitlines()[:8]
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def varlen_data(tmp_path_factory) -> Path:
    """AdvertiseGen rows of very different lengths, so per-rank token counts differ within a batch."""
    rng = random.Random(0)
    rows = []
    for line in (REPO / "data" / "advertisegen_demo" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:96]:
        row = json.loads(line)
        row["summary"] = row["summary"] * rng.choice([1, 1, 2, 3])
        row["content"] = row["content"][: rng.randint(8, len(row["content"]))]
        rows.append(row)
    path = tmp_path_factory.mktemp("data") / "varlen.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The README's demo command (`deepspeed launch/train.py`, i.e. configs/demo.yaml), run once per session
    into a fresh temporary output_dir, never the repository's out/: (output_dir, the finished process).
    Shared by the demo test and the distillation demo, whose teacher it is."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    cmd = [deepspeed, "launch/train.py", "configs/demo.yaml", f"--output_dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=900)
    return out, proc
