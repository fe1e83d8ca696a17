"""Tokenize a recipe's data once, ahead of training, into the cache every rank and node reuses.

python launch/prepare.py configs/x.yaml [--key=value ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dist_glm.cli import prepare_main  # noqa: E402

if __name__ == "__main__":
    prepare_main(sys.argv[1:])
