"""Run a distillation recipe's teacher once and cache its top-k logits, for training without a teacher.

python launch/distill_cache.py configs/x.yaml --teacher_model_name_or_path=DIR --distill_cache=DIR [--distill_top_k=64]
deepspeed --num_gpus 8 launch/distill_cache.py ...      # ranks share the rows
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dist_glm.cli import distill_cache_main  # noqa: E402

if __name__ == "__main__":
    distill_cache_main(sys.argv[1:])
