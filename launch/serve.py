"""Serve a trained GLM behind an OpenAI-compatible HTTP API (/v1/models, /v1/chat/completions).

python launch/serve.py --model_name_or_path out/demo --port 8000
python launch/serve.py --model_name_or_path out/lora_run --port 8000 --api_key $KEY     # adapter + its base
python launch/serve.py --help                                                          # every flag
See docs/serving.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dist_glm.cli import serve_main as main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
