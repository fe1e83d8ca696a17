"""Per-rank memory of model states under each ZeRO stage, measured on real ranks against the ZeRO paper's
accounting (benchmarks/memory.py says how).

python launch/benchmark_memory.py                 # 2 ranks, the tiny GLM; prints a table
python launch/benchmark_memory.py --ranks=4 --model=assets/tiny-glm4-0414
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from benchmarks.memory import main  # noqa: E402

if __name__ == "__main__":
    main()
