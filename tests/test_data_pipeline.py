"""The data pipeline inside real runs: bad rows on 2 ranks, skip reports, and the prepare.py cache."""

import json

import pytest

from conftest import REPO, base_args, run_script, run_train


def rows_with_one_bad(tmp_path, n=40):
    good = [json.loads(x) for x in (REPO / "data/advertisegen_demo/train.jsonl").read_text().splitlines()[:n]]
    lines = [json.dumps(r, ensure_ascii=False) for r in good]
    lines.insert(5, '{"content": "类型#裙"}')  # line 6: no summary
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.slow
def test_bad_row_stops_every_rank_with_file_and_line(tmp_path):
    data = rows_with_one_bad(tmp_path)
    proc = run_train(
        base_args(tmp_path / "out", data, max_steps=2, data_cache_dir=tmp_path / "cache"),
        nprocs=2,
        check=False,
        timeout=300,
    )  # a rank left waiting would hit the timeout instead
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"train.py: error: {data}:6: missing field 'summary'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_skip_mode_trains_and_reports_every_skipped_row(tmp_path):
    data = rows_with_one_bad(tmp_path)
    out = tmp_path / "out"
    proc = run_train(base_args(out, data, max_steps=2, on_invalid="skip", data_cache_dir=tmp_path / "cache"), nprocs=2)
    report = [json.loads(x) for x in (out / "skipped_rows.jsonl").read_text().splitlines()]
    assert report == [{"where": f"{data}:6", "error": "missing field 'summary'"}]
    assert "41 rows -> 40 samples" in proc.stdout and "1 invalid rows skipped" in proc.stdout


@pytest.mark.slow
def test_prepare_ahead_then_training_does_no_tokenization(tmp_path):
    data = rows_with_one_bad(tmp_path)
    data.write_text("\n".join(x for x in data.read_text().splitlines() if "summary" in x) + "\n")
    args = base_args(tmp_path / "out", data, max_steps=2, data_cache_dir=tmp_path / "cache")
    prep = run_script("prepare.py", args)
    assert prep.returncode == 0 and "tokenized into" in prep.stdout, prep.stderr[-2000:]
    proc = run_train(args, nprocs=2)
    assert "reused cache" in proc.stdout and "tokenized into" not in proc.stdout


@pytest.mark.slow
def test_val_size_evaluates_on_held_out_training_rows(tmp_path):
    data = REPO / "data" / "advertisegen_demo" / "train.jsonl"
    proc = run_train(base_args(tmp_path, data, max_steps=2, max_samples=200, val_size=16), nprocs=2)
    assert "val_size=16: 16 of 200 samples held out for evaluation (seed 7" in proc.stdout
    assert "184 train / 16 eval samples" in proc.stdout
    from conftest import read_metrics

    assert sorted(read_metrics(tmp_path, "eval/loss")) == [2]
