"""One measurement for every framework, taken from outside: the benchmark starts each run as a child
process, watches the file where the run logs each step (ours: metrics.jsonl; LLaMA-Factory:
trainer_log.jsonl; HF Trainer and TRL: steps.jsonl), and samples the child's whole process tree.

- a step's time is when its log line appears (polled every POLL_S), the same clock for all;
- CPU seconds are the tree's user + system time (psutil, reaped children included), read at those moments;
- peak RSS is the largest sum of resident memory over the tree seen by any sample.
"""

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

POLL_S = 0.05


@dataclass
class Job:
    label: str
    command: list[str]
    step_log: Path  # where the run appends one json line per logged step
    log: Path  # its stdout + stderr
    env: dict | None = None
    cwd: str | None = None


@dataclass
class StepMark:
    step: int
    loss: float
    seconds: float  # since the process started
    cpu_seconds: float  # the tree's CPU time at that moment


@dataclass
class RunResult:
    label: str
    returncode: int | None = None
    marks: list[StepMark] = field(default_factory=list)
    peak_rss_bytes: int = 0
    wall_seconds: float = 0.0
    error: str = ""  # why the run gave no numbers (the log's last line), or ""


def parse_step_line(line: str) -> tuple[int, float] | None:
    """(step, loss) from any of the frameworks' step logs; None for a line that is not a train step."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = row.get("step", row.get("current_steps"))
    loss = row.get("train/loss", row.get("loss"))
    if step is None or loss is None:
        return None
    return int(step), float(loss)


def tree_sample(proc: psutil.Process) -> tuple[int, float]:
    """(resident bytes, CPU seconds) of a process and all its descendants."""
    rss, cpu = 0, 0.0
    try:
        members = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0.0
    for p in members:
        try:
            t = p.cpu_times()
            rss += p.memory_info().rss
            cpu += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            continue
    return rss, cpu


class _Watch:
    def __init__(self, job: Job):
        self.job, self.result, self.offset, self.last_cpu = job, RunResult(job.label), 0, 0.0
        job.step_log.parent.mkdir(parents=True, exist_ok=True)
        job.step_log.unlink(missing_ok=True)
        self.out = open(job.log, "w", encoding="utf-8")
        self.started = time.time()
        try:
            self.popen = subprocess.Popen(
                job.command, stdout=self.out, stderr=subprocess.STDOUT, env=job.env, cwd=job.cwd, start_new_session=True
            )
        except OSError:
            self.out.close()
            raise
        self.proc = psutil.Process(self.popen.pid)

    def poll(self) -> bool:
        """Sample once; False when the run has ended."""
        rss, cpu = tree_sample(self.proc)
        self.last_cpu = max(self.last_cpu, cpu)  # a child that just exited and is not reaped yet drops out
        self.result.peak_rss_bytes = max(self.result.peak_rss_bytes, rss)
        self._read_steps(time.time())
        if self.popen.poll() is None:
            return True
        self._read_steps(time.time())
        self.result.returncode, self.result.wall_seconds = self.popen.returncode, time.time() - self.started
        self.out.close()
        return False

    def _read_steps(self, now: float) -> None:
        if not self.job.step_log.exists():
            return
        with open(self.job.step_log, encoding="utf-8") as f:
            f.seek(self.offset)
            text = f.read()
        complete = text[: text.rfind("\n") + 1]  # a line being written is read on the next poll
        self.offset += len(complete.encode("utf-8"))
        for line in complete.splitlines():
            parsed = parse_step_line(line)
            if parsed:
                self.result.marks.append(StepMark(parsed[0], parsed[1], now - self.started, self.last_cpu))

    def kill(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_together(jobs: list[Job], timeout_s: float) -> list[RunResult]:
    """Start every job at once (so they share the machine's load), watch until all end."""
    watches: list[_Watch] = []
    try:
        watches += [_Watch(j) for j in jobs]  # a job that cannot start leaves the started ones to the finally
        running = list(watches)
        deadline = time.time() + timeout_s
        while running:
            running = [w for w in running if w.poll()]
            if running and time.time() > deadline:
                for w in running:
                    w.kill()
                    w.result.error = f"killed after {timeout_s:g} s"
            time.sleep(POLL_S)
    finally:
        # Each run is in its own session (so a kill takes its whole tree), which also keeps Ctrl-C from
        # reaching it: an interrupted benchmark kills its runs here rather than leaving them training.
        for w in watches:
            if w.popen.poll() is None:
                w.kill()
                w.popen.wait()
            w.out.close()
    for w in watches:
        r = w.result
        if r.returncode and not r.error:
            tail = [ln for ln in Path(w.job.log).read_text(errors="replace").splitlines() if ln.strip()]
            r.error = f"exit {r.returncode}: {tail[-1][:160] if tail else 'no output'} (log: {w.job.log})"
    return [w.result for w in watches]
