"""Side-by-side training benchmark: ours vs HF Trainer, TRL SFTTrainer and LLaMA-Factory (docs/performance.md).

python launch/benchmark.py                                   # every workload and peer, 3 rounds; prints one table
python launch/benchmark.py --workloads=tiny --peers=none --steps=5 --rounds=1    # ours alone, quick
python launch/benchmark.py --peers=hf,trl --output=bench.md --cache_dir=/tmp/bench
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dist_glm.cli import run_command  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    from benchmarks.run import BENCH

    def body(s):
        from benchmarks.run import bench

        print(bench(s["bench"], log=lambda line: print(line, flush=True)))

    run_command(BENCH, argv, body)


if __name__ == "__main__":
    main()
