"""Build DeepSpeed's just-in-time C++ ops once, in one process, before any training run needs them.

DeepSpeed compiles CPU Adam (used by optimizer offload) and, on the CPU accelerator, its shared-memory
collective op the first time a run needs them (about two minutes on two cores). Built lazily inside a
multi-rank run, the compile counts against that run, and a rank killed mid-build leaves torch's
`lock` file behind, after which every later run waits on it forever. Building here, alone, avoids both.

    python -m dist_glm.runtime.ops           # prints what it built; safe to re-run (seconds once cached)
"""

import os
import sys
import threading
import time
from pathlib import Path

from dist_glm.runtime.doctor import extensions_dir
from dist_glm.runtime.environment import use_cpu_accelerator_if_no_gpu

NOTICE_AFTER_S = 5  # a lock present this long means this run is building or waiting: say so


def lock_timeout() -> float:
    """Seconds after which a build lock counts as left by a killed builder (a build takes 1-7 minutes)."""
    return float(os.environ.get("DIST_GLM_BUILD_LOCK_TIMEOUT", 900))


def _locks(root: Path) -> list[Path]:
    # torch's layout: ROOT/OP/lock, or ROOT/pyXY_cuZZ/OP/lock
    return [p for pattern in ("*/lock", "*/*/lock") for p in root.glob(pattern)]


def _age(path: Path) -> float | None:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:  # the builder just finished
        return None


def clear_stale_locks(root: Path, older_than_s: float = 600) -> list[Path]:
    """torch's build lock is an empty file that a killed builder never removes. A lock older than any
    build takes is left over from such a process."""
    stale = []
    for lock in _locks(root):
        age = _age(lock)
        if age is not None and age > older_than_s:
            lock.unlink(missing_ok=True)
            stale.append(lock)
    return stale


def watch_build_locks(root: Path, rank: str = "") -> None:
    """Every entry point, before DeepSpeed can build anything. A lock already older than the timeout is
    removed (its builder is gone: no build takes that long). Then a background thread says within
    seconds when this process sits behind a build lock, with its path and age, and once that lock is
    older than the timeout stops the run with the fix, instead of waiting forever on a silent log."""
    timeout = lock_timeout()
    who = f"[dist_glm{' rank ' + rank if rank else ''}]"
    for lock in clear_stale_locks(root, timeout):
        print(f"{who} removed a stale DeepSpeed build lock {lock} (older than {timeout:.0f} s)", file=sys.stderr)

    def watch():
        announced = set()
        while True:
            time.sleep(1)
            for lock in _locks(root):
                age = _age(lock)
                if age is None:
                    continue
                if age >= NOTICE_AFTER_S and lock not in announced:
                    announced.add(lock)
                    print(
                        f"{who} DeepSpeed is building {lock.parent.name} or waiting for another process to (build "
                        f"lock {lock}, {age:.0f} s old); a build takes 1-7 minutes",
                        file=sys.stderr,
                        flush=True,
                    )
                if age > timeout:
                    print(
                        f"{who} error: the DeepSpeed build lock {lock} is {age:.0f} s old: the process that "
                        f"built {lock.parent.name} was killed; delete the lock (or run "
                        "`python -m dist_glm.runtime.ops`) and rerun (DIST_GLM_BUILD_LOCK_TIMEOUT sets this limit)",
                        file=sys.stderr,
                        flush=True,
                    )
                    os._exit(2)

    threading.Thread(target=watch, name="build-lock-watch", daemon=True).start()


def build_ops() -> list[str]:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    names = ["CPUAdamBuilder"]
    if accelerator.device_name() == "cpu":
        names.append("ShareMemCommBuilder")
    built = []
    for name in names:
        builder = accelerator.create_op_builder(name)
        if builder is None or not builder.is_compatible(verbose=False):
            continue
        # The first build compiles C++ for minutes and prints nothing itself: say what is happening.
        print(f"DeepSpeed op {builder.NAME}: loading it, or building it once for this environment (minutes "
              "the first time, seconds after)", flush=True)  # fmt: skip
        builder.load(verbose=False)
        built.append(name)
    return built


def main() -> int:
    use_cpu_accelerator_if_no_gpu()
    root = extensions_dir()
    os.environ["TORCH_EXTENSIONS_DIR"] = str(root)
    for lock in clear_stale_locks(root):
        print(f"removed a stale build lock: {lock}")
    start = time.time()
    built = build_ops()
    print(f"DeepSpeed ops ready in {root}: {', '.join(built) or 'none needed'} ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
