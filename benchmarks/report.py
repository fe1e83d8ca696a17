"""Numbers from the measured runs, and the one table the benchmark prints.

Throughput counts non-pad tokens: each logged step trains batch_size rows, and a row's non-pad tokens
are known from the data (the mean over the rows, since each framework draws its own order), so
tokens/s = tokens of the steps after the first logged one / wall time from the first logged step to
the last. The first step (model set-up, first-touch allocations) is left out of throughput and shown
as "first step s": process start to the first logged step.
"""

import statistics
import time
from dataclasses import dataclass

from benchmarks.measure import RunResult

GIB = 2**30


@dataclass
class Numbers:
    tokens_per_second: float
    tokens_per_cpu_second: float
    peak_rss_gib: float
    first_step_seconds: float
    loss_at: float | None  # the loss logged at the fixed step (None when that step was not logged)


def numbers(r: RunResult, tokens_per_step: float, loss_step: int) -> Numbers | None:
    """None when the run logged fewer than two steps (nothing to time)."""
    if len(r.marks) < 2 or r.error:
        return None
    first, last = r.marks[0], r.marks[-1]
    tokens = tokens_per_step * (last.step - first.step)
    loss = next((m.loss for m in r.marks if m.step == loss_step), None)
    return Numbers(
        tokens / max(last.seconds - first.seconds, 1e-9),
        tokens / max(last.cpu_seconds - first.cpu_seconds, 1e-9),
        r.peak_rss_bytes / GIB,
        first.seconds,
        loss,
    )


@dataclass
class MatmulReference:
    """fp32 matmul FLOP per second of one thread (one CPU-second), measured while nothing else of the
    benchmark runs: `tries` timings, their best and their spread."""

    timings: list[float]

    @property
    def best(self) -> float:
        return max(self.timings)

    @property
    def spread(self) -> float:
        """(best - worst) / best: how much the machine moved under the measurement."""
        return (max(self.timings) - min(self.timings)) / max(self.timings)


def matmul_reference(n: int = 1024, tries: int = 5, seconds: float = 0.5) -> MatmulReference:
    """One thread's fp32 matmul rate: the most a CPU-second can do, so MFU per CPU-second is against it
    whatever the thread count. On one thread a busy machine slows it only by taking the core away, which
    the spread of the tries shows."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.matmul(a, b)  # warm-up: first-touch pages
        timings = []
        for _ in range(tries):
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                torch.matmul(a, b)
                count += 1
            timings.append(2 * n**3 * count / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(threads)
    return MatmulReference(timings)


TRUSTED_SPREAD = 0.10  # best tries before and after the rounds further apart than this: the machine was busy


def mfu_text(flops_per_cpu_second: float, before: MatmulReference, after: MatmulReference, above: str = "") -> str:
    """`MFU x %` with its uncertainty, or why no number is given: a reference that changed between before and
    after the rounds by more than TRUSTED_SPREAD (a busy machine) and a utilisation above 100% are measurement
    errors, never printed as results. The spread of the tries within one measurement is reported, not used."""
    # Other work on the machine only slows a try down, so each measurement's best try is the core's rate; the
    # best before and after the rounds must agree, or the core itself was not the same (frequency, a noisy
    # neighbour for minutes): then there is no trustworthy reference.
    change = abs(before.best - after.best) / max(before.best, after.best)
    if change > TRUSTED_SPREAD:
        return (
            f"not given: the matmul reference moved {100 * change:.0f} % between before and after the rounds "
            "(machine busy); rerun on an idle machine"
        )
    reference = max(before.best, after.best)
    mfu = flops_per_cpu_second / reference
    if mfu > 1:
        why = above or "so the reference is wrong"
        return f"not given: {100 * mfu:.0f} % is above what the reference allows, {why}"
    uncertainty = mfu * max(change, 0.01)
    return f"{100 * mfu:.0f} +- {100 * uncertainty:.0f} % (reference {reference / 1e9:.1f} GFLOP/s per thread)"


def matmul_params(model_dir: str) -> tuple[int, int]:
    """(body, LM head) parameters that take part in matmuls (all but the input embedding), from the config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    embedding, head = model.get_input_embeddings().weight.numel(), model.get_output_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - embedding - head, head


def _fmt(values: list[float], digits: int) -> str:
    return f"{min(values):.{digits}f} / {statistics.median(values):.{digits}f}"


def table(workload_rows: list[dict], frameworks: list[str], ours: str, ratio: str = "ours / it") -> str:
    """workload_rows: {"workload", "numbers": {framework: [Numbers or None per run]}, "pairs": {framework:
    [(ours, its) Numbers of runs that ran together]}, "skipped": {framework: reason}, "errors": {framework:
    reason}}. Ratios are ours / that framework within each pair (a round), then min-max."""
    head = (
        "| workload | framework | non-pad tok/s (min / median) | tok per CPU-s (min / median) | peak RSS GiB (max) "
        f"| first step s (median) | loss at step k (each round) | {ratio}, tok/s (per round) "
        f"| {ratio}, per CPU-s |\n|---|---|--:|--:|--:|--:|---|--:|--:|"
    )
    lines = [head]
    for row in workload_rows:
        for fw in frameworks:
            if fw in row["skipped"]:
                lines.append(f"| {row['workload']} | {fw} | skipped: {row['skipped'][fw]} | | | | | | |")
                continue
            runs = row["numbers"].get(fw, [])
            good = [n for n in runs if n]
            if not good:
                lines.append(f"| {row['workload']} | {fw} | no result ({row['errors'].get(fw, '?')}) | | | | | | |")
                continue
            losses = ", ".join("-" if not n or n.loss_at is None else f"{n.loss_at:.3f}" for n in runs)
            pairs = [(m, n) for m, n in row["pairs"].get(fw, []) if m and n]
            wall = [m.tokens_per_second / n.tokens_per_second for m, n in pairs]
            cpu = [m.tokens_per_cpu_second / n.tokens_per_cpu_second for m, n in pairs]
            ratio = "" if fw == ours or not wall else f"{min(wall):.2f}-{max(wall):.2f}x"
            cpu_ratio = "" if fw == ours or not cpu else f"{min(cpu):.2f}-{max(cpu):.2f}x"
            lines.append(
                f"| {row['workload']} | {fw} | {_fmt([n.tokens_per_second for n in good], 0)} "
                f"| {_fmt([n.tokens_per_cpu_second for n in good], 0)} | {max(n.peak_rss_gib for n in good):.2f} "
                f"| {statistics.median(n.first_step_seconds for n in good):.1f} | {losses} | {ratio} | {cpu_ratio} |"
            )
    return "\n".join(lines)
