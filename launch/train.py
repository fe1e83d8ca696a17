"""Fine-tune a GLM model. With no arguments it runs the embedded demo (configs/demo.yaml).

deepspeed launch/train.py [CONFIG.yaml] [--key=value ...]
deepspeed --num_gpus 8 launch/train.py configs/glm4_9b_lora.yaml --learning_rate=2e-4
python launch/train.py configs/demo.yaml --max_steps=10          # single process
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dist_glm.cli import train_main  # noqa: E402

if __name__ == "__main__":
    train_main(sys.argv[1:])
