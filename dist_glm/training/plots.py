"""Loss and eval curves as PNG files, from one or more runs' metrics.jsonl (matplotlib, Agg backend: no
display needed). Training writes its own at the end with `plot_loss: true`; `launch/plot.py RUN...`
overlays several runs.

The training curve is smoothed the way TensorBoard smooths (an exponential moving average with its
start-up bias corrected, weight `smoothing`), drawn over the raw values in a lighter shade; eval metrics
are drawn as points joined by lines.
"""

import json
from pathlib import Path

SMOOTHING = 0.6  # TensorBoard's default slider position


def read_series(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """metric -> (steps, values) from run_dir/metrics.jsonl."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    path = Path(run_dir) / "metrics.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if "/" in key and isinstance(value, (int, float)):
                steps, values = series.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(float(value))
    return series


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """TensorBoard's smoothing: EMA with the bias of its zero start divided out."""
    out, last, num = [], 0.0, 0
    for v in values:
        last, num = last * weight + (1 - weight) * v, num + 1
        out.append(last / (1 - weight**num))
    return out


def plot_runs(run_dirs: list[Path], out_dir: Path, smoothing: float = SMOOTHING) -> list[Path]:
    """training_loss.png and eval_<metric>.png for the runs (one line each, named by directory); returns
    the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {Path(d).name or str(d): read_series(Path(d)) for d in run_dirs}
    metrics = ["train/loss"] + sorted({k for s in runs.values() for k in s if k.startswith("eval/")})
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        for i, (name, series) in enumerate(runs.items()):
            if metric not in series:
                continue
            steps, values = series[metric]
            color = f"C{i}"
            label = name if len(runs) > 1 else metric
            if metric == "train/loss":
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=1)
                ax.plot(steps, smooth(values, smoothing), color=color, linewidth=2, label=f"{label} (smoothed)")
            else:
                ax.plot(steps, values, color=color, marker="o", linewidth=1.5, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(metric.split("/", 1)[1])
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        name = "training_loss.png" if metric == "train/loss" else f"eval_{metric.split('/', 1)[1]}.png"
        fig.savefig(out_dir / name)
        plt.close(fig)
        written.append(out_dir / name)
    return written
