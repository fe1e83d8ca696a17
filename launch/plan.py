"""Per-rank GPU memory and node host RAM of a training recipe under each ZeRO stage and offload choice,
and the cheapest setting that fits (docs/planning.md). Reads the model's config.json, no weights.

python launch/plan.py configs/glm4_9b_full.yaml --num_gpus=8 --gpu_memory_gb=80 [--key=value ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dist_glm.cli import plan_main  # noqa: E402

if __name__ == "__main__":
    plan_main(sys.argv[1:])
