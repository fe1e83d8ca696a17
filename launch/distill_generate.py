"""Sequence-level distillation: the teacher answers the recipe's prompts into a dataset the student trains on.

python launch/distill_generate.py configs/x.yaml --teacher_model_name_or_path=DIR --output_file=teacher.jsonl
deepspeed --num_gpus 8 launch/distill_generate.py ...   # ranks share the prompts
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dist_glm.cli import distill_generate_main  # noqa: E402

if __name__ == "__main__":
    distill_generate_main(sys.argv[1:])
