"""Monitoring: TensorBoard + metrics.jsonl logging, the progress line, throughput and MFU."""

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

from dist_glm.runtime import collectives

# Dense bf16 peak FLOP/s per device, for MFU. Unknown hardware (and CPUs) report no MFU rather than
# a made-up one.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
    "4090": 165e12,
    "V100": 125e12,
}


def peak_flops_per_device() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def train_flops_per_token(num_params: int, config) -> float:
    """6N for the dense matmuls (forward + backward) plus attention scores (PaLM appendix B).
    Uses a 1024-token context for the attention term; it is small next to 6N for GLM sizes."""
    layers = getattr(config, "num_hidden_layers", 0)
    hidden = getattr(config, "hidden_size", 0)
    return 6 * num_params + 12 * layers * hidden * 1024


def memory_gb() -> float:
    """Peak accelerator memory on GPU; peak resident set size of this process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


# The HParams tab's metric columns, the same for every run so that runs line up; written at the end.
FINAL_METRICS = ("final/train_loss", "final/eval_loss", "final/best_eval_loss")


def run_settings(cfg, world: int, zero_stage: int, total_steps: int) -> dict:
    """The main settings of a run, as the HParams tab's columns (numbers, strings and booleans only)."""
    t, d = cfg.train, cfg.data
    return {
        "model": Path(cfg.model.model_name_or_path).name,
        "finetuning_type": cfg.method.finetuning_type,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler_type,
        "warmup_ratio": t.warmup_ratio,
        "warmup_steps": t.warmup_steps,
        "weight_decay": t.weight_decay,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "world_size": world,
        "global_batch_size": t.global_batch_size(world),
        "total_steps": total_steps,
        "zero_stage": zero_stage,
        "dtype": "bf16" if t.bf16 else "fp16" if t.fp16 else "fp32",
        "lora_rank": cfg.method.lora_rank,
        "lora_alpha": cfg.method.lora_alpha,
        "cutoff_len": d.cutoff_len,
        "packing": "auto" if d.packing is None else d.packing,
        "distill_alpha": cfg.distill.distill_alpha if cfg.distill.enabled else 0.0,
        "seed": t.seed,
    }


class OutputUnwritable(Exception):
    """output_dir stopped taking writes mid-run; raised on every rank together (exit 1)."""


class MetricsLogger:
    """Rank 0 writes; other ranks hold a disabled logger so call sites need no rank checks.

    On resume from step S, records after S (written by the interrupted run) are dropped from both
    metrics.jsonl and TensorBoard (purge_step), so each file tells one consistent history. Trackers
    (dist_glm.training.trackers) get a copy of every TensorBoard scalar, same name and step.
    """

    def __init__(self, output_dir: str, enabled: bool, resume_step: int = 0):
        self.enabled, self.resume_step, self.trackers, self._session_end = enabled, resume_step, [], None
        self.output_dir, self.write_error = output_dir, None  # the first write output_dir refused
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.path, runs = Path(output_dir) / "metrics.jsonl", Path(output_dir) / "runs"
        self.started, self.elapsed_before = time.time(), 0.0
        if resume_step and self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines() if json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
            # A resumed run's clock continues from the interrupted one's last record.
            self.elapsed_before = json.loads(kept[-1]).get("elapsed_s", 0.0) if kept else 0.0
        elif not resume_step:
            # A fresh run (the trainer already refused to start over existing checkpoints unless told
            # to) starts a fresh history rather than mixing its curves with an earlier run's.
            self.path.unlink(missing_ok=True)
            for old in runs.glob("events.out.tfevents.*"):
                old.unlink()
        self.writer = SummaryWriter(str(runs), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled or self.write_error:
            return
        now = time.time()
        clock = {"time": round(now, 3), "elapsed_s": round(self.elapsed_before + now - self.started, 3)}
        try:  # TensorBoard's writer re-raises its own write errors here too
            self._scalars(step, values)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **values, **clock}) + "\n")
            self.writer.flush()
        except OSError as e:  # read-only, full, gone: every rank learns it in stop_if_unwritable
            name = Path(e.filename).name if e.filename else self.path.name
            self.write_error = f"{name}: {e.strerror or e}"

    def stop_if_unwritable(self, step: int, rank: int) -> None:
        """Collective: rank 0 alone writes the logs, so when output_dir stops taking its writes every rank
        learns it here and stops together (rank 0 dying alone would leave the others in a collective
        until the ddp timeout), one line each, as a failed checkpoint save does."""
        error = collectives.broadcast_object(self.write_error if self.enabled else None)
        if error:
            from dist_glm.checkpointing.checkpoints import list_checkpoints

            intact = [p.name for _, p in list_checkpoints(self.output_dir)]
            raise OutputUnwritable(
                f"rank {rank}: output_dir='{self.output_dir}' stopped taking writes at step {step} ({error}); "
                f"{', '.join(intact) + ' intact' if intact else 'no checkpoint yet'}. Make it writable again "
                "(permissions, space, a read-only mount), then rerun with --resume_from_checkpoint=auto"
            )

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        for tracker in self.trackers:
            tracker.log(step, values)

    def log_config(self, config_yaml: str) -> None:
        """The resolved config as text in TensorBoard (its Text tab), so a run's curves carry their settings."""
        if self.enabled:
            self.writer.add_text("config", "```\n" + config_yaml + "\n```", 0)

    def start_run(self, cfg, settings: dict) -> list[str]:
        """The HParams record (`settings` and FINAL_METRICS' names) in this run's own directory, and the
        trackers report_to names, with the resolved config (and `settings`) as their run's config.
        Returns the problem when a tracker could not start."""
        if not self.enabled:
            return []
        from torch.utils.tensorboard.summary import hparams

        experiment, session_start, self._session_end = hparams(settings, dict.fromkeys(FINAL_METRICS, 0.0))
        if not self.resume_step:  # a resumed run keeps its first record (steps <= the resume step survive)
            # Into runs/ itself, where add_hparams would open a sub-run: the tab then shows this run's
            # settings next to its own final/* scalars.
            for summary in (experiment, session_start):
                self.writer._get_file_writer().add_summary(summary)
        from dist_glm.training.trackers import open_trackers

        config = {**cfg.to_flat_dict(), **settings}
        self.trackers, problems = open_trackers(cfg.train, config, resumed=bool(self.resume_step))
        return problems

    def close(self, results: dict | None = None) -> None:
        """`results` (all_results.json's) when training finished: its final metrics go to the HParams tab
        and the trackers; without them (a preempted run) the trackers' runs are only closed."""
        if not self.enabled:
            return
        if results is None:
            for tracker in self.trackers:
                tracker.close()
        else:
            final = final_metrics(results)
            self._scalars(results["global_step"], final)
            if self._session_end is not None:
                self.writer._get_file_writer().add_summary(self._session_end)
            for tracker in self.trackers:
                tracker.finish(final)
        self.writer.close()


def final_metrics(results: dict) -> dict[str, float]:
    """The last train loss and the first eval set's last and best loss, under FINAL_METRICS' names."""
    eval_loss = results.get("eval/loss")
    if eval_loss is None:  # named eval sets: eval/NAME/loss, the first one is what best_eval_loss follows
        eval_loss = next((v for k, v in results.items() if k.startswith("eval/") and k.endswith("/loss")), None)
    values = (results.get("train/loss"), eval_loss, results.get("best_eval_loss"))
    return {name: v for name, v in zip(FINAL_METRICS, values, strict=True) if v is not None}


class Progress:
    """Rank 0's progress: tqdm's bar on a terminal; in a log file (Slurm, nohup, a pipe), where the bar's
    `\r` updates pile up into one unreadable line, a plain line every `every` steps instead. The loss shown
    is the mean over the logging window so far, the number metrics.jsonl and TensorBoard record at the
    window's end (not the last step's alone); s/step is labelled as the average since the start."""

    def __init__(self, total: int, initial: int, enabled: bool, every: int):
        self.total, self.step, self.every, self.enabled = total, initial, max(1, every), enabled
        self.started, self.first = time.perf_counter(), initial
        self.window: list[float] = []  # this logging window's losses
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, file=sys.stdout)

    def update(self, loss: float, lr: float, counted: bool = True) -> None:
        """`counted`: the step's update reached the weights (a skipped step is not in the logged mean)."""
        self.step += 1
        if counted:
            self.window.append(loss)
        mean = sum(self.window) / len(self.window) if self.window else float("nan")
        ends_window = self.step % self.every == 0 or self.step == self.total
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
        elif self.enabled and ends_window:
            per_step = (time.perf_counter() - self.started) / (self.step - self.first)
            eta = round(per_step * (self.total - self.step))
            print(
                f"[dist_glm] step {self.step}/{self.total} ({100 * self.step / self.total:.0f}%) loss {mean:.4f} "
                f"(mean of {len(self.window)} steps, as logged) lr {lr:.2e} {per_step:.2f} s/step (average) "
                f"eta {eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}",
                flush=True,
            )
        if ends_window:
            self.window = []

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class ThroughputWindow:
    """Train metrics averaged over the steps since the last log line."""

    def __init__(self, flops_per_token: float, world: int):
        self.flops_per_token, self.world, self.peak = flops_per_token, world, peak_flops_per_device()
        self.loss, self.steps, self.tokens, self.seconds, self.grad_norm = 0.0, 0, 0.0, 0.0, 0.0
        self.parts: dict[str, float] = {}  # an objective's named parts of the loss (train/kd_loss, ...)

    def add(self, loss: float, grad_norm: float, tokens: float, seconds: float, parts: dict | None = None) -> None:
        self.loss, self.steps, self.grad_norm = self.loss + loss, self.steps + 1, grad_norm
        self.tokens, self.seconds = self.tokens + tokens, self.seconds + seconds
        for name, value in (parts or {}).items():
            self.parts[name] = self.parts.get(name, 0.0) + value

    def flush(self, learning_rate: float, epoch: float) -> dict[str, float]:
        tokens_per_second = self.tokens / self.seconds
        record = {
            "train/loss": self.loss / self.steps,
            "train/learning_rate": learning_rate,
            "train/grad_norm": self.grad_norm,  # of the window's last step, before clipping
            "train/tokens_per_second": tokens_per_second,
            "train/memory_gb": memory_gb(),
            "train/epoch": epoch,
        }
        record.update({f"train/{name}": total / self.steps for name, total in self.parts.items()})
        if self.peak:
            record["train/mfu"] = tokens_per_second * self.flops_per_token / (self.peak * self.world)
        self.loss, self.steps, self.tokens, self.seconds, self.parts = 0.0, 0, 0.0, 0.0, {}
        return record


def json_safe(values: dict) -> dict:
    """Non-finite floats as null: Infinity and NaN are not JSON, and most parsers refuse them."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
