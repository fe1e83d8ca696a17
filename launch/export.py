"""Export a trained result as one standalone HF model (safetensors, config, tokenizer, generation config).

python launch/export.py --model_name_or_path=BASE --adapter_name_or_path=out/lora1 --export_dir=out/merged
python launch/export.py --model_name_or_path=out/run1/checkpoint-600 --export_dir=out/step600   # any ZeRO stage
LoRA and QLoRA adapters are merged (QLoRA into its de-quantized base); P-tuning prefixes are refused.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dist_glm.cli import export_main  # noqa: E402

if __name__ == "__main__":
    export_main(sys.argv[1:])
