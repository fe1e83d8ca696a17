"""Run a preference recipe's reference model once and cache its log-probability of every row, for training
without a reference model (stage=dpo / kto).

python launch/ref_cache.py configs/x.yaml --ref_logps_cache=DIR [--ref_model=DIR]
deepspeed --num_gpus 8 launch/ref_cache.py ...      # ranks share the rows
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dist_glm.cli import ref_cache_main  # noqa: E402

if __name__ == "__main__":
    ref_cache_main(sys.argv[1:])
