"""Loss and eval curves of one or more runs as PNG files, overlaid.

python launch/plot.py out/run1 out/run2 --out_dir=plots
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dist_glm.cli import plot_main  # noqa: E402

if __name__ == "__main__":
    plot_main(sys.argv[1:])
