"""The data-pipeline benchmark (launch/benchmark_data.py): how fast a large dataset is tokenized into
the cache, how long training takes to reach its first step once the cache exists, and how much memory
each rank holds, for dist_glm and for LLaMA-Factory's `datasets` cache on the same generated rows.

Every number is measured on real processes started the way users start them: `launch/prepare.py` and
`deepspeed --num_gpus 2 launch/train.py` here, `llamafactory-cli train` (torchrun, 2 ranks) there.
Peak RSS per rank is each rank process's VmHWM (the kernel's high-water mark of resident memory, so a
short peak between two samples is not missed), read from /proc while the run lasts. Time to first step
is from the launch until the run's own per-step log (metrics.jsonl, trainer_log.jsonl) has its first
record.
"""

import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dist_glm.options import Command, option

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = REPO / "assets" / "tiny-glm4"

# AdvertiseGen's attribute keys with values the tiny tokenizer (assets/tiny-glm4) was built on, so a
# generated row tokenizes to real pieces, not byte fallbacks.
ATTRIBUTES = {
    "类型": ["上衣", "外套", "衬衫", "裤子", "连衣裙"],
    "颜色": ["白色", "粉色", "红色", "绿色", "蓝色", "黑色"],
    "风格": ["休闲", "复古", "甜美", "简约", "通勤"],
    "图案": ["条纹", "格子", "碎花", "纯色"],
    "材质": ["棉质", "牛仔", "针织", "雪纺"],
}
STYLE_ENDINGS = {
    "休闲": "穿着舒适自在",
    "复古": "尽显优雅韵味",
    "甜美": "俏皮又可爱",
    "简约": "百搭又大方",
    "通勤": "干练又得体",
}


def advertisegen_row(rng: random.Random) -> dict:
    """One AdvertiseGen-shaped row ({"content": "类型#...*颜色#...", "summary": ...}). Attributes other
    than the type are each left out now and then, so lengths vary as in the real data."""
    picked = {k: rng.choice(v) for k, v in ATTRIBUTES.items() if k == "类型" or rng.random() < 0.8}
    summary = f"这款{picked.get('颜色', '')}{picked['类型']}"
    if "材质" in picked:
        summary += f"采用{picked['材质']}面料"
    if "图案" in picked:
        summary += f"，{picked['图案']}图案点缀"
    if "风格" in picked:
        summary += f"，{picked['风格']}风格{STYLE_ENDINGS[picked['风格']]}"
    content = "*".join(f"{k}#{v}" for k, v in picked.items())
    return {"content": content, "summary": summary + "。"}


def write_rows(path: Path, n: int, seed: int = 0) -> Path:
    """`n` generated rows as a jsonl file (the same file for the same n and seed)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps(advertisegen_row(rng), ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------- measuring a run


@dataclass
class Measured:
    returncode: int
    wall_s: float
    first_step_s: float | None  # None: the run never logged a step
    cpu_s: float = 0.0  # user + system CPU time of the whole process tree (the waited-for children)
    # The launched process's CPU time plus its busiest child's: the wall time on a machine with a core
    # for each of them (the parent waits while its workers run), whatever else the machine is running.
    idle_wall_s: float = 0.0
    peak_rss_mb: dict[int, float] = field(default_factory=dict)  # rank -> VmHWM of that rank's process
    output: str = ""


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue  # the task ended while we looked
    return out


def _rank_of(pid: int) -> int | None:
    """The rank a process runs as (RANK in its environment, which launchers set only for rank
    processes), or None for the launchers themselves and their helpers."""
    try:
        env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
    except OSError:
        return None
    return int(env["RANK"]) if "RANK" in env and "LOCAL_RANK" in env else None


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _has_record(log_file: Path | None) -> bool:
    try:
        return log_file is not None and any(line.strip() for line in log_file.read_text().splitlines())
    except OSError:
        return False


def run_measured(
    cmd: list[str], env: dict, cwd: Path, step_log: Path | None = None, stop_on: str = "", timeout: float = 7200
) -> Measured:
    """Run `cmd`, sampling every rank process's peak RSS and watching `step_log` for the first step.
    With `stop_on`, the run is stopped (its whole process group) once that text appears in its output,
    and wall_s is the time it took to appear."""
    import resource
    import signal
    import tempfile

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    first_step, peaks, ranks, text, wall, cpu_of = None, {}, {}, "", None, {}
    with tempfile.NamedTemporaryFile("w+", encoding="utf-8", errors="replace") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        reader = open(out.name, encoding="utf-8", errors="replace")
        try:
            while proc.poll() is None:
                text += reader.read()
                if stop_on and stop_on in text:
                    wall = time.monotonic() - start
                    break
                if time.monotonic() - start > timeout:
                    break
                todo = [proc.pid]
                while todo:  # the whole tree: launchers start the ranks as grandchildren
                    pid = todo.pop()
                    todo += _children(pid)
                    if ranks.get(pid) is None:  # read again until exec: a fork still has its parent's environment
                        ranks[pid] = _rank_of(pid)
                    cpu_of[pid] = _cpu_s(pid) or cpu_of.get(pid, 0.0)
                    hwm = _vm_hwm_mb(pid)
                    if ranks[pid] is not None and hwm is not None:
                        peaks[ranks[pid]] = max(peaks.get(ranks[pid], 0.0), hwm)
                if first_step is None and _has_record(step_log):
                    first_step = time.monotonic() - start
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank it started
            proc.wait()
            text += reader.read()
            reader.close()
    wall = wall if wall is not None else time.monotonic() - start
    rc = 0 if stop_on and stop_on in text else proc.returncode
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    idle = cpu_of.pop(proc.pid, 0.0) + max(cpu_of.values(), default=0.0)
    return Measured(rc, wall, first_step, cpu, idle, dict(sorted(peaks.items())), text)


def check(m: Measured, what: str) -> Measured:
    if m.returncode != 0:
        raise RuntimeError(f"{what} failed ({m.returncode}):\n{m.output[-4000:]}")
    return m


# ---------------------------------------------------------------- dist_glm


def dist_glm_env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def dist_glm_args(data: Path, cache: Path, output_dir: Path, cutoff_len: int, **more) -> list[str]:
    """A small full fine-tuning run of the tiny GLM on `data` with its cache in `cache`."""
    args = {
        "model_name_or_path": TINY_MODEL,
        "train_from_scratch": True,
        "dataset": data,
        "data_cache_dir": cache,
        "output_dir": output_dir,
        "finetuning_type": "full",
        "cutoff_len": cutoff_len,
        "per_device_train_batch_size": 4,
        "max_steps": 2,
        "logging_steps": 1,
        "save_steps": 0,
        "disable_tqdm": True,
        "seed": 7,
        **more,
    }
    return [f"--{k}={v}" for k, v in args.items()]


def dist_glm_prepare(data: Path, cache: Path, work: Path, workers: int, cutoff_len: int) -> Measured:
    args = dist_glm_args(data, cache, work / "prepare-out", cutoff_len, preprocessing_num_workers=workers)
    cmd = [sys.executable, str(REPO / "launch" / "prepare.py"), *args]
    return check(run_measured(cmd, dist_glm_env(), REPO), "launch/prepare.py")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_glm_train(data: Path, cache: Path, output_dir: Path, cutoff_len: int, ranks: int = 2, **more) -> Measured:
    """`deepspeed --num_gpus N launch/train.py` (CPU, gloo) for a couple of steps."""
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    launcher = [deepspeed, "--num_gpus", str(ranks), "--master_port", str(free_port())]
    cmd = launcher + [str(REPO / "launch" / "train.py"), *dist_glm_args(data, cache, output_dir, cutoff_len, **more)]
    shutil.rmtree(output_dir, ignore_errors=True)
    return check(run_measured(cmd, dist_glm_env(), REPO, output_dir / "metrics.jsonl"), "launch/train.py")


# ---------------------------------------------------------------- LLaMA-Factory, the peer


def tiny_model_with_weights(target: Path) -> Path:
    """The tiny GLM with seeded random weights saved beside its tokenizer: LLaMA-Factory loads a
    checkpoint (it has no train-from-scratch switch); dist_glm's runs use the same config."""
    if (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_MODEL)).save_pretrained(target)
    for f in TINY_MODEL.iterdir():
        if f.name != "config.json":
            shutil.copy(f, target / f.name)
    return target


def llamafactory_recipe(
    work: Path, data: Path, model: Path, tokenized: Path, out: Path, workers: int, cutoff_len: int, ranks: int = 1
) -> Path:
    """LLaMA-Factory's own SFT recipe for the same rows and settings (its glm4 template, full tuning)."""
    import yaml

    info = work / "dataset_info"
    info.mkdir(parents=True, exist_ok=True)
    spec = {"file_name": str(data.resolve()), "columns": {"prompt": "content", "response": "summary"}}
    (info / "dataset_info.json").write_text(json.dumps({"bench": spec}))
    recipe = {
        "model_name_or_path": str(model),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "full",
        "dataset": "bench",
        "dataset_dir": str(info),
        "template": "glm4",
        "cutoff_len": cutoff_len,
        "preprocessing_num_workers": workers,
        "tokenized_path": str(tokenized),
        "output_dir": str(out),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": 4,
        "max_steps": 2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "dataloader_num_workers": 0,
    }
    if ranks > 1:
        recipe["ddp_backend"] = "gloo"  # CPU ranks; a single process must not ask for a process group
    path = work / f"llamafactory_{workers}_workers_{ranks}_ranks.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def llamafactory_env(work: Path, ranks: int | None, venv_bin: Path) -> dict:
    # Its mm_plugin imports torchaudio unconditionally, and the registry's torchaudio (built against CUDA
    # torch) cannot load with the CPU build: an empty module of that name stands in. Text rows never
    # reach an audio code path, so nothing measured runs through it.
    stub = work / "stubs" / "torchaudio"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "__init__.py").write_text('"""Stand-in: text-only SFT imports torchaudio but never calls it."""\n')
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["HF_DATASETS_CACHE"] = str(work / "hf_datasets_cache")  # its json -> Arrow step starts cold too
    env["CUDA_VISIBLE_DEVICES"] = ""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["PYTHONPATH"] = str(stub.parent)
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"  # its launcher calls `torchrun` by name
    if ranks:
        env.update(FORCE_TORCHRUN="1", NNODES="1", NPROC_PER_NODE=str(ranks), MASTER_PORT=str(free_port()))
    return env


# ---------------------------------------------------------------- the table


def bench_dist_glm(data: Path, work: Path, n: int, cutoff_len: int, workers: list[int]) -> dict:
    row = {"system": "dist_glm (.npy cache, memory-mapped)"}
    for w in workers:
        cache = work / f"dist_glm_cache_{w}"
        shutil.rmtree(cache, ignore_errors=True)
        m = dist_glm_prepare(data, cache, work, w, cutoff_len)
        row[f"rows/s, {w} worker(s)"] = (n / m.wall_s, n / m.idle_wall_s)
    row["cache on disk (MB)"] = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2**20
    m = dist_glm_train(data, cache, work / "dist_glm_out", cutoff_len)
    if "reused cache" not in m.output:
        raise RuntimeError("the warm-cache run did not reuse the cache:\n" + m.output[-3000:])
    row["first step, warm cache (s)"], row["peak RSS per rank (MB)"] = m.first_step_s, m.peak_rss_mb
    return row


def bench_llamafactory(data: Path, work: Path, n: int, cutoff_len: int, workers: list[int], cache: Path) -> dict:
    """LLaMA-Factory in the training benchmark's venv for it (benchmarks.peers: installed once)."""
    from benchmarks.peers import PEERS, ensure_venv

    python, pins = ensure_venv(cache, PEERS["llamafactory"])
    row = {"system": f"LLaMA-Factory {pins.split('==')[-1] if python else ''} (datasets Arrow, tokenized_path)"}
    if python is None:
        return {**row, "skipped": pins}
    cli = str(python.parent / "llamafactory-cli")
    model = tiny_model_with_weights(work / "tiny-glm4-weights")
    for w in workers:
        tokenized, out = work / f"llamafactory_tokenized_{w}", work / "llamafactory_out"
        shutil.rmtree(tokenized, ignore_errors=True)
        shutil.rmtree(work / "hf_datasets_cache", ignore_errors=True)
        recipe = llamafactory_recipe(work, data, model, tokenized, out, w, cutoff_len)
        # Its preprocessing ends with this line; the run would go on to train, which is not timed here.
        env = llamafactory_env(work, None, python.parent)
        m = run_measured([cli, "train", str(recipe)], env, work, stop_on="Tokenized dataset is saved")
        check(m, "llamafactory-cli train (preprocessing)")
        row[f"rows/s, {w} worker(s)"] = (n / m.wall_s, n / m.idle_wall_s)
    row["cache on disk (MB)"] = sum(f.stat().st_size for f in tokenized.rglob("*") if f.is_file()) / 2**20
    shutil.rmtree(out, ignore_errors=True)
    recipe = llamafactory_recipe(work, data, model, tokenized, out, workers[-1], cutoff_len, ranks=2)
    env = llamafactory_env(work, 2, python.parent)
    m = check(run_measured([cli, "train", str(recipe)], env, work, out / "trainer_log.jsonl"), "llamafactory-cli train")
    if "Loaded tokenized dataset" not in m.output:
        raise RuntimeError("LLaMA-Factory's warm run did not load its tokenized dataset:\n" + m.output[-3000:])
    row["first step, warm cache (s)"], row["peak RSS per rank (MB)"] = m.first_step_s, m.peak_rss_mb
    return row


def format_table(rows: list[dict], n: int) -> str:
    columns = ["system", "rows/s, 1 worker(s)", "rows/s, 2 worker(s)", "cache on disk (MB)"]
    columns += ["first step, warm cache (s)", "peak RSS per rank (MB)"]

    def cell(row, c):
        v = row.get(c)
        if isinstance(v, tuple):  # (rows/s measured, rows/s with a core per process)
            return f"{v[0]:,.0f} ({v[1]:,.0f} idle)"
        if isinstance(v, dict):
            return " / ".join(f"{x:.0f}" for x in v.values())
        if isinstance(v, float):
            return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"
        return "" if v is None else str(v)

    load = os.getloadavg()[0]
    lines = [
        f"{n:,} rows; {os.cpu_count()} CPUs, load average {load:.1f} at the end",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['system']} | skipped: {row['skipped']} |")
        else:
            lines.append("| " + " | ".join(cell(row, c) for c in columns) + " |")
    return "\n".join(lines)


@dataclass
class DataBenchArgs:
    rows: int = option(1_000_000, "Generated AdvertiseGen-shaped rows.")
    cutoff_len: int = option(96, "Tokens per sample at most.")
    workers: str = option("1,2", "Comma-separated preprocessing_num_workers values to time.")
    work_dir: str = option("~/.cache/dist_glm_bench/data", "Generated rows, caches and run logs.")
    cache_dir: str = option("~/.cache/dist_glm_bench", "The peers' venvs (venvs/), shared with launch/benchmark.py.")
    skip_llamafactory: bool = option(False, "Measure ours only.")


DATA_BENCH = Command(
    prog="benchmark_data.py",
    usage="benchmark_data.py [--rows=1000000] [--workers=1,2] [--skip_llamafactory]",
    sections={"bench": (DataBenchArgs, None)},
    description=__doc__.split("\n\n")[0],
)


def run(a: DataBenchArgs) -> None:
    workers = [int(w) for w in a.workers.split(",")]
    work_dir, cache_dir = Path(a.work_dir).expanduser(), Path(a.cache_dir).expanduser()
    work_dir.mkdir(parents=True, exist_ok=True)
    data = work_dir / f"advertisegen_{a.rows}.jsonl"
    if not data.exists():
        write_rows(data, a.rows)
    rows = [bench_dist_glm(data, work_dir, a.rows, a.cutoff_len, workers)]
    print(format_table(rows, a.rows), flush=True)
    if not a.skip_llamafactory:
        rows.append(bench_llamafactory(data, work_dir, a.rows, a.cutoff_len, workers, cache_dir))
    print(format_table(rows, a.rows), flush=True)


def main(argv: list[str] | None = None) -> None:
    from dist_glm.cli import run_command

    run_command(DATA_BENCH, argv, lambda s: run(s["bench"]))
