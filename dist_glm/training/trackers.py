"""Experiment trackers (wandb, SwanLab): optional extras, off by default, fed by MetricsLogger.

TensorBoard events and metrics.jsonl in output_dir are the run's own record and are always written; a
tracker named in `report_to` receives a copy of every scalar (same name, same step) and the resolved
config. Only rank 0 opens one. Where a run goes (online, offline, local) is the library's own setting
(WANDB_MODE, SWANLAB_MODE), so `WANDB_MODE=offline` keeps everything on this machine.
"""

import importlib.util
import json
import os
import secrets
import string
from pathlib import Path

from dist_glm.config import TRACKERS, TrainConfig, report_to_names
from dist_glm.runtime.collectives import log
from dist_glm.runtime.staging import unique_temp_file

# Each tracker run's id, kept in output_dir so that a resumed run finds it and continues the same run.
IDS_FILE = "tracker_runs.json"


def trackers_in(report_to: str) -> list[str]:
    """The trackers report_to names, in order (tensorboard and none name none)."""
    return [n for n in report_to_names(report_to) if n in TRACKERS]


def check_installed(report_to: str) -> list[str]:
    """Before any model loads: a tracker named in report_to whose library is missing, with the fix."""
    return [
        f"report_to={report_to}: the {name} package is not installed; run `pip install -e .[{name}]` in the "
        f"dist_glm checkout (or `pip install {name}`), or remove {name} from report_to"
        for name in trackers_in(report_to)
        if importlib.util.find_spec(name) is None
    ]


def run_ids(output_dir: Path, names: list[str], resumed: bool) -> dict[str, str]:
    """The tracker run ids of this training run: the interrupted run's when resuming, new ones otherwise
    (a fresh start in the same output_dir is a new history, as in TensorBoard)."""
    path = output_dir / IDS_FILE
    saved = {}
    if resumed and path.is_file():
        try:
            saved = json.loads(path.read_text())
        except ValueError:  # rank 0 must not die alone here: the other ranks wait in the broadcast after it
            log(f"{path} is unreadable: the trackers start new runs instead of continuing the interrupted ones")
    # Lower-case letters and digits: valid for both libraries (wandb's own ids look the same).
    alphabet = string.ascii_lowercase + string.digits
    ids = {name: saved.get(name) or "".join(secrets.choice(alphabet) for _ in range(12)) for name in names}
    tmp = unique_temp_file(path)  # a kill mid-write leaves the old file whole; never another file's name
    tmp.write_text(json.dumps({**saved, **ids}, indent=2))
    os.replace(tmp, path)
    return ids


class Wandb:
    def __init__(self, t: TrainConfig, name: str, run_id: str, config: dict):
        import wandb

        # resume="allow": continue run `run_id` if it exists (a resume), else start it. Its files go to
        # output_dir/wandb rather than the working directory, next to the rest of the run.
        self.run = wandb.init(
            project=t.tracker_project, name=name, id=run_id, resume="allow", dir=t.output_dir, config=config
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        # An explicit step: the same x axis as TensorBoard. wandb drops steps below the run's last one,
        # so after a resume the interrupted run's records past the checkpoint stay (they are the same steps
        # from the same state).
        self.run.log(values, step=step)

    def finish(self, final: dict[str, float]) -> None:
        self.run.summary.update(final)
        self.run.finish()

    def close(self) -> None:
        self.run.finish()


class SwanLab:
    def __init__(self, t: TrainConfig, name: str, run_id: str, config: dict):
        import swanlab

        self.run = swanlab.init(
            project=t.tracker_project,
            name=name,
            id=run_id,
            resume="allow",
            log_dir=str(Path(t.output_dir) / "swanlog"),
            config=config,
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def finish(self, final: dict[str, float]) -> None:
        self.run.finish()  # the final metrics arrive as scalars through `log`

    def close(self) -> None:
        self.run.finish()


CLASSES = {"wandb": Wandb, "swanlab": SwanLab}
assert set(CLASSES) == set(TRACKERS)


def open_trackers(t: TrainConfig, config: dict, resumed: bool) -> tuple[list, list[str]]:
    """Rank 0 only: (the trackers report_to names, each continuing its earlier run when `resumed`; the
    problem when one could not start). Problems are returned, not raised: every rank must stop together."""
    names = trackers_in(t.report_to)
    if not names:
        return [], []
    ids = run_ids(Path(t.output_dir), names, resumed)
    run_name = t.run_name or Path(t.output_dir).resolve().name
    opened = []
    for name in names:
        try:
            opened.append(CLASSES[name](t, run_name, ids[name], config))
        except Exception as e:  # the library's own error (not logged in, no network), as one line
            for tracker in opened:
                tracker.close()
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            return [], [
                f"report_to={t.report_to}: {name} could not start a run ({first}); log in "
                f"(`{name} login`) or set {name.upper()}_MODE=offline to keep the run on this machine"
            ]
    return opened, []
