"""Keep a launcher's command alive until its ranks have finished their preemption checkpoint.

Under the `deepspeed` launcher a SIGTERM to the job ends the top-level `deepspeed` process at once
(its single-node runner has no handler; measured: exit -15 while the ranks were still writing, the
checkpoint appeared ~8 s later), and its per-node launcher kills the ranks 30 s after forwarding the
signal. A scheduler that waits on the top-level command (Kubernetes signals PID 1 and then tears the
container down; most batch systems kill what is left once it exits) can therefore cut the save off.

`python launch/supervise.py deepspeed --num_gpus 8 launch/train.py recipe.yaml` runs the command in a
session of its own, so a signal to the job reaches only the supervisor. It forwards SIGTERM, SIGUSR1 and
SIGINT (as SIGTERM: checkpoint, do not crash) to the ranks alone, never to the launchers in between, and
exits only when the launcher has exited and no rank process is left, with the ranks' code: 75 when they
saved a preemption checkpoint. A second signal while they save stops everything at once (SIGKILL).

The ranks announce themselves once they can take a signal (dist_glm.runtime.preemption writes RANK.pid into
DIST_GLM_SUPERVISOR_DIR); a signal that arrives before is held until then. Only this host's ranks are
covered: across nodes use the Slurm templates or mpirun's own forwarding.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PREEMPTED_EXIT = 75  # dist_glm.runtime.preemption's; not imported from there, so that this process never loads torch

FORWARDED = {signal.SIGTERM: signal.SIGTERM, signal.SIGUSR1: signal.SIGUSR1, signal.SIGINT: signal.SIGTERM}
USAGE = "usage: python launch/supervise.py LAUNCH COMMAND...   (e.g. deepspeed --num_gpus 2 launch/train.py cfg.yaml)"


def _say(msg: str) -> None:
    print(f"[dist_glm] supervise: {msg}", file=sys.stderr, flush=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A rank that exited but whose parent has not reaped it yet is gone for our purpose.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


class Supervisor:
    def __init__(self, command: list[str]):
        self.dir = Path(tempfile.mkdtemp(prefix="dist_glm_supervise_"))
        env = dict(os.environ, DIST_GLM_SUPERVISOR_DIR=str(self.dir))
        env.setdefault("DIST_GLM_PREEMPTED_FILE", str(self.dir / "preempted"))
        self.marker = Path(env["DIST_GLM_PREEMPTED_FILE"])
        self.pending: int | None = None  # a signal the ranks have not been sent yet
        self.signalled = 0
        for sig in FORWARDED:
            signal.signal(sig, self._on_signal)
        self.child = subprocess.Popen(command, env=env, start_new_session=True)

    def ranks(self) -> list[int]:
        pids = []
        for f in self.dir.glob("*.pid"):
            try:
                pids.append(int(f.read_text()))
            except ValueError:  # being written
                continue
        return pids

    def _on_signal(self, signum, frame) -> None:
        self.signalled += 1
        if self.signalled > 1:
            _say(f"second signal ({signal.Signals(signum).name}): stopping everything now, without a checkpoint")
            os.killpg(self.child.pid, signal.SIGKILL)
            return
        self.pending = FORWARDED[signum]

    def _forward(self) -> None:
        ranks = [pid for pid in self.ranks() if _alive(pid)]
        if self.pending is None or not ranks:
            return
        for pid in ranks:
            try:
                os.kill(pid, self.pending)
            except ProcessLookupError:
                pass
        _say(f"{signal.Signals(self.pending).name} sent to {len(ranks)} rank(s); waiting for their checkpoint")
        self.pending = None

    def wait(self) -> int:
        while self.child.poll() is None:
            self._forward()
            time.sleep(0.2)
        # The launcher may exit before its ranks (killed, or not waiting): they must not be left writing.
        while any(_alive(pid) for pid in self.ranks()):
            self._forward()
            time.sleep(0.2)
        rc = self.child.returncode
        if self.marker.is_file():
            _say(f"the ranks saved a preemption checkpoint ({self.marker.read_text().strip()}); exit {PREEMPTED_EXIT}")
            rc = PREEMPTED_EXIT
        shutil.rmtree(self.dir, ignore_errors=True)
        return 128 - rc if rc < 0 else rc


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__.split("\n\n", 1)[1].strip())
        sys.exit(0 if argv else 2)
    try:
        supervisor = Supervisor(argv)
    except OSError as e:
        print(f"supervise.py: error: cannot start {argv[0]!r} ({e.strerror}); is it on PATH?", file=sys.stderr)
        sys.exit(2)
    sys.exit(supervisor.wait())
