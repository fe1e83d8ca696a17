"""Run a launcher (deepspeed, mpirun, torchrun) so that a preemption signal to the job waits for the
ranks' checkpoint instead of ending the job while they write; exit 75 when they saved one.

python launch/supervise.py deepspeed --num_gpus 2 launch/train.py configs/x.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dist_glm.cli import supervise_main  # noqa: E402

if __name__ == "__main__":
    supervise_main()
