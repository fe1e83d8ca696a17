"""Training speed against what users would pick instead (HF Trainer, TRL, LLaMA-Factory), measured
from outside the same way for every framework: `python launch/benchmark.py` (docs/performance.md).
`run` drives it, `peers` installs the peers' venvs, `workloads` builds the shared weights, rows and
each framework's settings, `measure` watches the runs, `report` turns them into the table;
`peer_train.py` is the script HF Trainer and TRL run in their own venvs."""
