"""report_to: wandb and SwanLab get every TensorBoard scalar and the config, offline, and a resumed run
continues the same tracker run; TensorBoard's HParams record sits in the run's own directory.

The slow tests train the tiny GLM for real with WANDB_MODE=offline and SWANLAB_MODE=offline and read
back the files each library writes for a later `wandb sync` / `swanlab sync` (LevelDB-log records of
protobufs, the format both use)."""

import importlib.util
import json
import struct
import sys

import pytest

from conftest import NOT_EXERCISED, REPO, base_args, read_metrics, run_train
from dist_glm.config import collect_config
from dist_glm.errors import UserError
from dist_glm.training.telemetry import FINAL_METRICS
from dist_glm.training.trackers import IDS_FILE, check_installed, run_ids, trackers_in

DATA = REPO / "data" / "advertisegen_demo" / "train.jsonl"
INSTALLED = [name for name in ("wandb", "swanlab") if importlib.util.find_spec(name)]


def needs(name: str):
    return pytest.mark.skipif(
        name not in INSTALLED,
        reason=f"{NOT_EXERCISED}report_to={name}: not installed (pip install -c constraints.txt -e .[{name}])",
    )


# ---------------------------------------------------------------- config and start-up checks


def test_report_to_takes_a_list_or_a_comma_string(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: m\ndataset: d.jsonl\noutput_dir: o\nreport_to: [tensorboard, wandb]\n")
    cfg, problems = collect_config([str(recipe), "--run_name=first"])
    assert problems == [] and cfg.train.report_to == "tensorboard,wandb" and cfg.train.run_name == "first"
    assert trackers_in(cfg.train.report_to) == ["wandb"]
    assert trackers_in("SwanLab, wandb, swanlab") == ["swanlab", "wandb"]
    assert trackers_in("none") == trackers_in("tensorboard") == []
    default, _ = collect_config(["--model_name_or_path=m", "--dataset=d.jsonl", "--output_dir=o"])
    assert trackers_in(default.train.report_to) == [] and default.train.tracker_project == "dist_glm"


@pytest.mark.parametrize("value", ["mlflow", "all", "wandb,comet_ml"])
def test_unknown_trackers_are_refused_with_the_choices(value):
    _, problems = collect_config(
        ["--model_name_or_path=m", "--dataset=d.jsonl", "--output_dir=o", f"--report_to={value}"]
    )
    assert len(problems) == 1 and problems[0].startswith(f"report_to={value}: "), problems
    assert "use wandb and/or swanlab" in problems[0] and "wandb," not in problems[0].split(":")[1]


def test_a_missing_tracker_stops_training_before_any_model_loads(tmp_path, monkeypatch):
    from dist_glm.training.loop import train

    # None in sys.modules is Python's own "this package cannot be imported": find_spec returns None.
    monkeypatch.setitem(sys.modules, "swanlab", None)
    assert check_installed("tensorboard,none") == []
    cfg, problems = collect_config(base_args(tmp_path / "out", DATA, report_to="tensorboard,swanlab"))
    assert problems == []
    with pytest.raises(UserError) as err:
        train(cfg)  # raises before forming a process group or loading anything
    (line,) = err.value.problems
    assert "the swanlab package is not installed; run `pip install -e .[swanlab]`" in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- real runs, offline


def leveldb_records(path) -> list[bytes]:
    """The records of a LevelDB log file (wandb's .wandb and SwanLab's .swanlab): a 7-byte file header,
    then 32 KiB blocks of records, each with a 7-byte header (crc32, length, type: 1 full, 2 first,
    3 middle, 4 last)."""
    data, pos, out, part = path.read_bytes(), 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            out.append(part)
            part = b""
    return out


def tensorboard_scalars(output_dir) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output_dir / "runs")).Reload()
    return {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}


def wandb_run(output_dir) -> list[dict]:
    """Each offline run under output_dir/wandb: its id, config, history {(key, step): value} and summary."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs = []
    for file in sorted((output_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        run = {"id": None, "config": {}, "history": {}, "summary": {}}
        for data in leveldb_records(file):
            rec = pb.Record()
            rec.ParseFromString(data)
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run["id"] = rec.run.run_id
                run["config"].update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
            elif kind == "config":
                run["config"].update({u.key: json.loads(u.value_json) for u in rec.config.update})
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                step = items.pop("_step")
                run["history"].update({(k, step): v for k, v in items.items() if not k.startswith("_")})
            elif kind == "summary":
                run["summary"].update(
                    {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in rec.summary.update}
                )
        runs.append(run)
    return runs


def swanlab_runs(output_dir) -> list[dict]:
    """Each offline run under output_dir/swanlog: its id, config (files/config.yaml) and scalars."""
    import yaml
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record

    runs = []
    for file in sorted((output_dir / "swanlog").glob("run-*/run-*.swanlab")):
        run = {"id": None, "scalars": {}}
        for data in leveldb_records(file):
            rec = Record()
            rec.ParseFromString(data)
            kind = rec.WhichOneof("record_type")
            if kind == "start":
                run["id"], run["project"], run["name"] = rec.start.id, rec.start.project, rec.start.name
            elif kind == "scalar":
                run["scalars"][(rec.scalar.key, rec.scalar.step)] = rec.scalar.value.number
        config = yaml.safe_load((file.parent / "files" / "config.yaml").read_text())
        run["config"] = {k: v["value"] for k, v in config.items()}
        runs.append(run)
    return runs


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, eval_data):
    """Two steps with a checkpoint, then a resume to step 4, with every installed tracker, offline."""
    out = tmp_path_factory.mktemp("tracked") / "glm-run"
    home = tmp_path_factory.mktemp("tracker_home")
    with pytest.MonkeyPatch.context() as env:
        # Offline, and the libraries' own settings and caches kept out of the user's home.
        for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "SWANLAB_SAVE_DIR", "SWANLAB_ROOT"):
            env.setenv(key, str(home / key.lower()))
        env.setenv("WANDB_MODE", "offline")
        env.setenv("SWANLAB_MODE", "offline")
        for key in ("WANDB_API_KEY", "SWANLAB_API_KEY", "WANDB_RUN_ID", "SWANLAB_RUN_ID"):
            env.delenv(key, raising=False)
        settings = dict(report_to=",".join(["tensorboard", *INSTALLED]), eval_dataset=eval_data, eval_steps=2)
        run_train(base_args(out, DATA, max_steps=2, save_steps=2, **settings), nprocs=2)
        first = {"scalars": tensorboard_scalars(out), "ids": json.loads((out / IDS_FILE).read_text())}
        if "wandb" in INSTALLED:
            first["wandb"] = wandb_run(out)
        if "swanlab" in INSTALLED:
            first["swanlab"] = swanlab_runs(out)
        run_train(base_args(out, DATA, max_steps=4, resume_from_checkpoint="auto", **settings), nprocs=2)
    return out, first


@pytest.mark.slow
def test_hparams_record_in_the_runs_own_directory(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out, _ = tracked_run
    events = EventAccumulator(str(out / "runs")).Reload()
    content = {
        tag: plugin_data_pb2.HParamsPluginData.FromString(c) for tag, c in events.PluginTagToContent("hparams").items()
    }
    start = content["_hparams_/session_start_info"].session_start_info.hparams
    assert start["finetuning_type"].string_value == "full" and start["model"].string_value == "tiny-glm4"
    assert start["learning_rate"].number_value == pytest.approx(2e-3)
    assert start["per_device_train_batch_size"].number_value == 4 and start["world_size"].number_value == 2
    assert start["global_batch_size"].number_value == 8 and start["zero_stage"].number_value == 0
    assert start["cutoff_len"].number_value == 96 and start["seed"].number_value == 7
    assert start["total_steps"].number_value == 2  # the first run's (a resume keeps the first record)
    experiment = content["_hparams_/experiment"].experiment
    assert [m.name.tag for m in experiment.metric_infos] == list(FINAL_METRICS)
    assert {h.name for h in experiment.hparam_infos} == set(start)
    assert content["_hparams_/session_end_info"].session_end_info.status == 1  # STATUS_SUCCESS
    # The metric columns are scalars of this same run, at the last step.
    results = json.loads((out / "all_results.json").read_text())
    scalars = tensorboard_scalars(out)
    assert scalars[("final/train_loss", 4)] == pytest.approx(results["train/loss"], rel=1e-6)
    assert scalars[("final/eval_loss", 4)] == pytest.approx(results["eval/loss"], rel=1e-6)
    assert scalars[("final/best_eval_loss", 4)] == pytest.approx(results["best_eval_loss"], rel=1e-6)
    assert not list((out / "runs").glob("*/events.out.tfevents.*"))  # no sub-run (add_hparams' default)


def assert_same_scalars(tracker: dict, tensorboard: dict, steps: range):
    expected = {k: v for k, v in tensorboard.items() if k[1] in steps}
    assert set(tracker) == set(expected)
    for key, value in expected.items():
        assert tracker[key] == pytest.approx(value, rel=1e-6), key  # TensorBoard keeps float32


@pytest.mark.slow
@needs("wandb")
def test_wandb_offline_run_has_every_scalar_and_the_config(tracked_run):
    out, first = tracked_run
    (before,) = first["wandb"]
    assert_same_scalars(before["history"], first["scalars"], range(0, 3))
    assert before["id"] == first["ids"]["wandb"]
    config = before["config"]
    assert config["learning_rate"] == 2e-3 and config["finetuning_type"] == "full"
    assert config["report_to"] == ",".join(["tensorboard", *INSTALLED])
    assert config["global_batch_size"] == 8 and config["output_dir"] == str(out)
    # Resumed: the same run id, continuing after the checkpoint's step; the final metrics in its summary.
    runs = wandb_run(out)
    assert len(runs) == 2 and runs[1]["id"] == before["id"]  # one run per training: rank 1 opened none
    assert_same_scalars(runs[1]["history"], tensorboard_scalars(out), range(3, 5))
    results = json.loads((out / "all_results.json").read_text())
    assert runs[1]["summary"]["final/best_eval_loss"] == pytest.approx(results["best_eval_loss"])
    assert runs[1]["history"][("train/loss", 4)] == pytest.approx(read_metrics(out, "train/loss")[4], rel=1e-6)


@pytest.mark.slow
@needs("swanlab")
def test_swanlab_offline_run_has_every_scalar_and_the_config(tracked_run):
    out, first = tracked_run
    (before,) = first["swanlab"]
    assert before["id"] == first["ids"]["swanlab"] and before["project"] == "dist_glm"
    assert before["name"] == "glm-run"  # output_dir's name
    assert_same_scalars(before["scalars"], first["scalars"], range(0, 3))
    assert before["config"]["learning_rate"] == 2e-3 and before["config"]["zero_stage"] == 0
    runs = swanlab_runs(out)
    assert len(runs) == 2 and runs[1]["id"] == before["id"]
    assert_same_scalars(runs[1]["scalars"], tensorboard_scalars(out), range(3, 5))


@pytest.mark.slow
@needs("wandb")
def test_a_tracker_that_cannot_start_is_one_line_with_the_fix(tmp_path, monkeypatch):
    from dist_glm.config import TrainConfig
    from dist_glm.training.trackers import open_trackers

    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not logged in
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    t = TrainConfig(output_dir=str(tmp_path / "out"), report_to="wandb")
    (tmp_path / "out").mkdir()
    trackers, (problem,) = open_trackers(t, {"learning_rate": 1e-4}, resumed=False)
    assert trackers == [] and problem.startswith("report_to=wandb: wandb could not start a run (")
    assert problem.endswith("log in (`wandb login`) or set WANDB_MODE=offline to keep the run on this machine")


def test_run_ids_survive_a_resume_and_a_half_written_file(tmp_path, capsys):
    first = run_ids(tmp_path, ["wandb"], resumed=False)
    assert run_ids(tmp_path, ["wandb", "swanlab"], resumed=True)["wandb"] == first["wandb"]
    # A run killed while the file was written (before it was written atomically): new runs, one line, no crash.
    (tmp_path / IDS_FILE).write_text('{"wandb": "ab')
    again = run_ids(tmp_path, ["wandb"], resumed=True)
    assert again["wandb"] != first["wandb"] and "unreadable" in capsys.readouterr().out
    assert json.loads((tmp_path / IDS_FILE).read_text()) == again
    assert not list(tmp_path.glob("*.tmp"))
