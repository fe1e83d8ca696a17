"""Measure what the planner predicts: run the real trainer and record each rank's peak tensor memory
above what it held before the model existed.

    DIST_GLM_MEASURE_DIR=OUT deepspeed --num_gpus 2 --module benchmarks.plan_measure RECIPE.yaml [--key=value ...]

The planner predicts what a GPU's caching allocator reports as torch.cuda.max_memory_allocated: bytes
of live tensors at their peak. On a GPU that is what is read here (reset just before the model loads).
On CPU the same quantity comes from PyTorch's profiler, which records every allocation and free of the
CPU allocator with its size: peak = the highest running sum of those from the moment the model starts
to load until training has exported its result. The process's resident memory is a poorer measure
on CPU: it also grows by the code pages and oneDNN kernels the first step loads (~180 MB here, the
same for a 1-token and a 4096-token batch) and by what glibc keeps for reuse. It is recorded as well
(`rss_growth_bytes`) for comparison. Writes OUT/rank_N.json.
"""

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

OUT_ENV = "DIST_GLM_MEASURE_DIR"


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _profiled_peak(prof) -> int:
    """Highest running sum of the CPU allocator's allocations (+) and frees (-) the profiler saw."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type().value == 0]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def main(argv: list[str]) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from dist_glm import cli
    from dist_glm.training import loop

    out = Path(os.environ[OUT_ENV])
    cuda = torch.cuda.is_available()
    state = {}
    load_model = loop.load_model

    def measured_load_model(*args, **kwargs):
        # The moment before the model exists: what is allocated now is not the planner's to predict.
        state["rss"] = _resident_bytes()
        if cuda:
            torch.cuda.synchronize()
            state["baseline"] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            state["profiler"] = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            state["profiler"].start()
        return load_model(*args, **kwargs)

    loop.load_model = measured_load_model  # observed, not replaced: the real loader runs
    try:
        cli.train_main(argv)
    finally:
        if "rss" in state:
            if cuda:
                peak = torch.cuda.max_memory_allocated() - state["baseline"]
            else:
                state["profiler"].stop()
                peak = _profiled_peak(state["profiler"])
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - state["rss"]  # ru_maxrss: KiB
            out.mkdir(parents=True, exist_ok=True)
            result = {"peak_bytes": peak, "rss_growth_bytes": rss}
            (out / f"rank_{os.environ.get('RANK', '0')}.json").write_text(json.dumps(result))


def measure(out: Path, train_argv: list[str], ranks: int, env: dict | None = None, timeout: float = 600) -> list[dict]:
    """Train on `ranks` ranks (one: a plain process; more: the deepspeed launcher, CPU or GPU) and return
    each rank's result."""
    import shutil

    env = {**(os.environ if env is None else env), OUT_ENV: str(out)}
    # `-m benchmarks.plan_measure`: the checkout's root on the path (benchmarks/ is not installed).
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")])
    )
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("DS_ACCELERATOR", "cuda" if shutil.which("nvidia-smi") else "cpu")
    if ranks == 1:
        cmd = [sys.executable, "-m", "benchmarks.plan_measure", *train_argv]
    else:
        deepspeed = str(Path(sys.executable).parent / "deepspeed")
        cmd = [deepspeed, "--num_gpus", str(ranks), "--module", "benchmarks.plan_measure", *train_argv]
    # Its own session, so a timeout kills the ranks too, not only the launcher above them.
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"training failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return [json.loads((out / f"rank_{r}.json").read_text()) for r in range(ranks)]


if __name__ == "__main__":
    main(sys.argv[1:])
