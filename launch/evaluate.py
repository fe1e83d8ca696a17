"""Evaluate a trained result: loss, perplexity and generation metrics on a whole eval set.

python launch/evaluate.py --model_name_or_path=out/run1 --eval_dataset=data/dev.jsonl
python launch/evaluate.py --model_name_or_path=BASE --adapter_name_or_path=out/lora1 --eval_dataset=data/dev.jsonl
python launch/evaluate.py configs/demo.yaml --model_name_or_path=out/demo/checkpoint-600   # settings from a recipe
Writes OUTPUT_DIR/eval_results.json and OUTPUT_DIR/generated_predictions.jsonl (default: <model>/eval/).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dist_glm.cli import evaluate_main  # noqa: E402

if __name__ == "__main__":
    evaluate_main(sys.argv[1:])
