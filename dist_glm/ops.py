"""Build DeepSpeed's just-in-time C++ ops once, in one process, before any training run needs them.

DeepSpeed compiles CPU Adam (used by optimizer offload) and, on the CPU accelerator, its shared-memory
collective op the first time a run needs them (about two minutes on two cores). Built lazily inside a
multi-rank run, the compile counts against that run, and a rank killed mid-build leaves torch's
`lock` file behind, after which every later run waits on it forever. Building here, alone, avoids both.

    python -m dist_glm.ops           # prints what it built; safe to re-run (seconds once cached)
"""

import os
import sys
import time
from pathlib import Path

from dist_glm.distributed import use_cpu_accelerator_if_no_gpu
from dist_glm.doctor import extensions_dir


def clear_stale_locks(root: Path, older_than_s: float = 600) -> list[Path]:
    """torch's build lock is an empty file that a killed builder never removes. A lock older than any
    build takes is left over from such a process."""
    stale = []
    for lock in root.rglob("lock"):
        if time.time() - lock.stat().st_mtime > older_than_s:
            lock.unlink(missing_ok=True)
            stale.append(lock)
    return stale


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
