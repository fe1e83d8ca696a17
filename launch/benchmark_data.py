"""Data-pipeline benchmark: tokenizing N generated AdvertiseGen-shaped rows into the cache with 1 and 2
preprocessing workers (rows/s), then time to the first step and peak RSS per rank of a 2-rank run from
the warm cache; the same for LLaMA-Factory's `datasets` cache on the same rows (its own venv).

    python launch/benchmark_data.py                      # 1,000,000 rows; prints one table
    python launch/benchmark_data.py --rows 200000 --skip_llamafactory

The logic is benchmarks/data.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from benchmarks.data import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
