"""Curves as pictures: TensorBoard's smoothing, one PNG per metric, several runs overlaid."""

import json

import pytest

from dist_glm import cli
from dist_glm.training.plots import plot_runs, read_series, smooth


def test_smoothing_is_tensorboards_debiased_ema():
    assert smooth([4.0]) == [4.0]  # no pull towards 0 at the start
    assert smooth([4.0, 2.0], weight=0.5) == pytest.approx([4.0, (0.25 * 4 + 0.5 * 2) / 0.75])
    assert smooth([1.0, 5.0], weight=0.0) == [1.0, 5.0]


def fake_run(path, losses, evals):
    path.mkdir(parents=True)
    lines = [{"step": i + 1, "train/loss": v, "train/learning_rate": 1e-3} for i, v in enumerate(losses)]
    lines += [{"step": s, "eval/loss": v, "eval/rouge-l": 100 - v} for s, v in evals]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_one_png_per_metric_and_runs_overlaid(tmp_path):
    a = fake_run(tmp_path / "a", [3.0, 2.0, 1.5, 1.0], [(0, 3.2), (4, 1.1)])
    b = fake_run(tmp_path / "b", [3.0, 2.5, 2.0, 1.8], [(0, 3.2), (4, 1.9)])
    assert read_series(a)["eval/loss"] == ([0, 4], [3.2, 1.1])
    written = plot_runs([a, b], tmp_path / "plots")
    names = sorted(p.name for p in written)
    assert names == ["eval_loss.png", "eval_rouge-l.png", "training_loss.png"]
    assert all(p.stat().st_size > 5_000 and p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_plot_command(tmp_path, capsys):
    a = fake_run(tmp_path / "a", [3.0, 2.0], [(2, 1.0)])
    cli.plot_main([str(a), f"--out_dir={tmp_path / 'p'}"])
    assert (tmp_path / "p" / "training_loss.png").is_file() and "training_loss.png" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.plot_main([str(tmp_path / "nothing"), "--smoothing=1.5"])
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and len(err) == 2
    assert "no metrics.jsonl there" in err[0] and "smoothing=1.5 must be in [0, 1)" in err[1]
