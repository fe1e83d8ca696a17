"""The training benchmark's own pieces, without the peers: the outside measurement of a real child
process, the table's ratios, the argument checks, and ours run end to end through launch/benchmark.py."""

import json
import re
import subprocess
import sys

import pytest

from benchmarks import measure, report
from benchmarks.run import BenchArgs, check_args
from dist_glm.errors import UserError
from tests.conftest import REPO


def shell_job(tmp_path, name: str, script: str) -> measure.Job:
    return measure.Job(name, ["sh", "-c", script], tmp_path / name / "steps.jsonl", tmp_path / f"{name}.log")


def test_a_child_is_timed_from_its_step_log_and_sampled_whole(tmp_path):
    log = tmp_path / "writer" / "steps.jsonl"
    # Three logged steps 0.4 s apart, then a step-less line; `sh` is the child and `sleep` its descendant.
    script = "".join(f'echo \'{{"step": {i}, "loss": {4 - i}.5}}\' >> {log}; sleep 0.3; ' for i in (1, 2, 3))
    script += f"echo '{{\"eval/loss\": 1}}' >> {log}"
    hung = shell_job(tmp_path, "hung", "sleep 30")
    writer, killed = measure.run_together([shell_job(tmp_path, "writer", script), hung], timeout_s=1.5)
    assert [m.step for m in writer.marks] == [1, 2, 3] and [m.loss for m in writer.marks] == [3.5, 2.5, 1.5]
    gaps = [b.seconds - a.seconds for a, b in zip(writer.marks, writer.marks[1:], strict=False)]
    assert all(0.3 - 2 * measure.POLL_S < g < 1.0 for g in gaps), gaps  # each line seen within a poll
    assert writer.returncode == 0 and not writer.error and writer.peak_rss_bytes > 0
    assert killed.error == "killed after 1.5 s" and killed.wall_seconds < 10

    n = report.numbers(writer, tokens_per_step=100.0, loss_step=2)
    span = writer.marks[-1].seconds - writer.marks[0].seconds
    assert n.tokens_per_second == pytest.approx(200 / span)
    assert n.loss_at == 2.5 and n.first_step_seconds == writer.marks[0].seconds
    assert report.numbers(killed, 100.0, 2) is None  # nothing to time: no row of numbers from it


def test_ratios_are_ours_over_the_peer_within_each_round(tmp_path):
    def run(label, seconds):
        r = measure.RunResult(label, 0, peak_rss_bytes=report.GIB)
        r.marks = [measure.StepMark(s, 1.0, t, t) for s, t in zip((1, 2, 3), seconds, strict=True)]
        return report.numbers(r, 10.0, 3)

    ours = [run("dist_glm", (1.0, 2.0, 3.0)), run("dist_glm", (1.0, 3.0, 5.0))]
    peer = [run("hf", (1.0, 3.0, 5.0)), run("hf", (1.0, 2.0, 3.0))]
    rows = [dict(workload="w", numbers={"dist_glm": ours, "hf": peer}, pairs={"hf": list(zip(ours, peer, strict=True))},
                 skipped={"llamafactory": "why"}, errors={})]  # fmt: skip
    text = report.table(rows, ["dist_glm", "hf", "llamafactory"], "dist_glm")
    hf_row = next(line for line in text.splitlines() if line.startswith("| w | hf |"))
    low, high = sorted(o.tokens_per_second / p.tokens_per_second for o, p in zip(ours, peer, strict=True))
    assert f"| {low:.2f}-{high:.2f}x |" in hf_row
    assert "| w | llamafactory | skipped: why |" in text


@pytest.mark.parametrize(
    "args,expect",
    [
        (
            BenchArgs(peers="hf,deepspeed_chat"),
            "--peers: unknown deepspeed_chat; choose from hf, hf_loop, trl, llamafactory",
        ),
        (BenchArgs(workloads="huge"), "--workloads: unknown huge"),
        (BenchArgs(steps=5, loss_step=9), "--loss_step=9 is past --steps=5"),
        (BenchArgs(rounds=0), "--rounds=0: must be at least 1"),
    ],
)
def test_bad_arguments_name_the_flag(args, expect):
    with pytest.raises(UserError, match=re.escape(expect)):
        check_args(args)


@pytest.mark.slow
def test_ours_alone_end_to_end(tmp_path):
    out = tmp_path / "table.md"
    cmd = [sys.executable, "launch/benchmark.py", "--workloads=tiny", "--peers=none", "--steps=3", "--rounds=1",
           "--profiles=matched", f"--cache_dir={tmp_path / 'cache'}", f"--output={out}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    row = next(line for line in out.read_text().splitlines() if "| dist_glm |" in line)
    cells = [c.strip() for c in row.split("|")[1:-1]]
    tokens_per_s, per_cpu_s, rss, first, loss = (cells[i] for i in (2, 3, 4, 5, 6))
    assert float(tokens_per_s.split(" / ")[0]) > 0 and float(per_cpu_s.split(" / ")[0]) > 0
    assert 0.1 < float(rss) < 8 and float(first) > 0
    assert 3 < float(loss) < 8  # step 3 of a random-init model on a 714-token vocabulary (ln 714 = 6.6)
    text = out.read_text()
    assert "GFLOP/s" in text and "### Same settings" in text and "### As users run them" not in text
    assert all(int(pct) <= 100 for pct in re.findall(r"MFU at 6N FLOP/token (\d+) ", text))

    bad = subprocess.run([sys.executable, "launch/benchmark.py", "--peers=nope"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--peers: unknown nope" in bad.stderr


def test_long_prompt_workloads_repeat_the_prompt_and_keep_the_answer(tmp_path):
    # The same trained tokens at two prompt lengths: what tells the cost of prompts from that of answers.
    from benchmarks import workloads

    demo = [json.loads(line) for line in workloads.DEMO_ROWS.read_text(encoding="utf-8").splitlines()]
    model = REPO / "assets" / "tiny-glm4"
    counts = {}
    for name in ("real_long", "real_long2x"):
        w = workloads.WORKLOADS[name]
        raw = workloads.write_rows(w, tmp_path / f"{name}.jsonl")
        rows = [json.loads(line) for line in raw.read_text(encoding="utf-8").splitlines()]
        assert [r["summary"] for r in rows] == [d["summary"] for d in demo]
        assert rows[0]["content"] == "*".join([demo[0]["content"]] * w.prompt_repeat)
        lengths = workloads.tokenize_rows(model, raw, w.cutoff_len, tmp_path / f"{name}.tok.jsonl")  # none cut
        tokenized = [json.loads(line) for line in (tmp_path / f"{name}.tok.jsonl").read_text().splitlines()]
        counts[name] = (sum(lengths), sum(sum(x != -100 for x in t["labels"]) for t in tokenized))
    (long_all, long_trained), (double_all, double_trained) = counts["real_long"], counts["real_long2x"]
    assert long_trained == double_trained and double_all > 1.8 * long_all


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, flag, expect",
    [
        ("benchmark_data.py", "--rows=many", "rows"),
        ("benchmark_data.py", "--row=5", "did you mean 'rows'"),
        ("benchmark_memory.py", "--ranks=two", "ranks"),
    ],
)
def test_every_benchmark_reads_its_flags_through_the_one_loader(script, flag, expect):
    # One argument system for every command: --help from the field docstrings, a bad flag one line, exit 2.
    helped = subprocess.run([sys.executable, f"launch/{script}", "--help"], cwd=REPO, capture_output=True, text=True)
    assert helped.returncode == 0 and "usage:" in helped.stdout.lower(), helped.stderr[-1000:]
    bad = subprocess.run([sys.executable, f"launch/{script}", flag], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and expect in bad.stderr, bad.stderr


def test_the_settings_files_each_peer_gets_agree_with_what_the_tables_say(tmp_path):
    """For both tables, the file each peer reads (settings.json for HF Trainer and TRL, recipe.yaml for
    LLaMA-Factory) holds exactly what the printed settings say was set; what is printed as a peer's own
    default is not set in its file; and no peer is given the unfused adamw_torch."""
    import yaml

    from benchmarks import workloads
    from benchmarks.run import OURS, build_jobs, settings_lines

    w = workloads.WORKLOADS["tiny"]
    pythons = {name: tmp_path / name / "bin" / "python" for name in ("hf", "hf_loop", "trl", "llamafactory")}
    own = {"optim": "adamw_torch_fused", "gradient_checkpointing": False}
    defaults = {"hf": own, "trl": own, "llamafactory": {**own, "gradient_checkpointing": True},
                "hf_loop": {"optim": "adamw_torch", "gradient_checkpointing": False}}  # fmt: skip
    for profile in workloads.PROFILES:
        run_root = tmp_path / profile
        build_jobs(w, tmp_path / "model", tmp_path / "data", pythons, run_root, tmp_path / "logs", profile)
        claims = dict(line.strip("- ").split(": ", 1) for line in settings_lines(profile, [OURS, *pythons], defaults))
        for name in pythons:
            if name == "llamafactory":
                given = yaml.safe_load((run_root / name / "recipe.yaml").read_text())
                gc = (
                    None
                    if "disable_gradient_checkpointing" not in given
                    else not given["disable_gradient_checkpointing"]
                )
            else:
                given = json.loads((run_root / name / "settings.json").read_text())["trainer_args"]
                gc = given.get("gradient_checkpointing")
            optim = given.get("optim")
            assert optim != "adamw_torch"
            if name == "llamafactory":  # fp32 is the workload's, for every peer (TRL would pick bf16 by itself)
                assert given["bf16"] is False and given["fp16"] is False
            else:
                from benchmarks.peer_train import PRECISION

                assert PRECISION == {"bf16": False, "fp16": False}
            assert "fp32 (the workload's" in claims[name]
            claim = claims[name]
            if optim is None:
                assert f"optimizer {defaults[name]['optim']} (its default)" in claim
            else:
                assert f"optimizer {optim} (set)" in claim
            state = {True: "on", False: "off"}
            if gc is None:
                assert f"checkpointing {state[defaults[name]['gradient_checkpointing']]} (its default)" in claim
            else:
                assert f"checkpointing {state[gc]} (set)" in claim
            if profile == "defaults":
                assert optim is None and gc is None, (name, given)
            else:
                assert optim == "adamw_torch_fused" and gc is False, (name, given)
        assert "gradient checkpointing on (its default)" in claims["llamafactory"] if profile == "defaults" else True


def test_mfu_is_never_above_100_percent_nor_from_a_busy_reference():
    steady = report.MatmulReference([50e9, 49e9, 50e9])
    assert report.mfu_text(10e9, steady, steady).startswith("20 +- 0 %")
    assert report.mfu_text(60e9, steady, steady).startswith("not given: 120 % is above")
    # A slow try (another process took the core for a moment) does not move the best one.
    assert report.mfu_text(10e9, report.MatmulReference([50e9, 20e9, 48e9]), steady).startswith("20 +- 0 %")
    slower = report.MatmulReference([30e9, 30e9, 30e9])  # the core itself changed between before and after
    assert report.mfu_text(10e9, steady, slower).startswith("not given: the matmul reference moved 40 %")


def test_a_multi_rank_workload_runs_ours_in_each_layout_with_the_global_batch_split(tmp_path):
    """moe_ep2: the deepspeed launcher over 2 ranks, 4 rows each (moe_full's global 8), the layout's flags
    last; the table's ratios are the first layout over the others."""
    from benchmarks import workloads

    w = workloads.WORKLOADS["moe_ep2"]
    assert (w.model, w.batch_size, w.cutoff_len) == (workloads.WORKLOADS["moe_full"].model, 8, 128)
    for _, extra in w.layouts:
        cmd = workloads.ours_command(w, tmp_path / "m", tmp_path / "rows.jsonl", tmp_path / "out", extra)
        assert cmd[0].endswith("deepspeed") and cmd[1:3] == ["--num_gpus", "2"] and cmd[-len(extra) :] == list(extra)
        assert "--per_device_train_batch_size=4" in cmd and "--gradient_accumulation_steps=1" in cmd
        assert all((REPO / f.split("=", 1)[1]).exists() for f in extra if f.startswith("--deepspeed="))
    assert [label for label, _ in w.layouts][0] == "ZeRO-2 + EP=2"
    single = workloads.ours_command(workloads.WORKLOADS["moe_full"], tmp_path / "m", tmp_path / "r", tmp_path / "o")
    assert single[0] == sys.executable and "--per_device_train_batch_size=8" in single

    def run(label, seconds):
        r = measure.RunResult(label, 0, peak_rss_bytes=report.GIB)
        r.marks = [measure.StepMark(s, 1.0, t, t) for s, t in zip((1, 2, 3), seconds, strict=True)]
        return report.numbers(r, 10.0, 3)

    ep, z3 = run("ZeRO-2 + EP=2", (1.0, 2.0, 3.0)), run("ZeRO-3", (1.0, 3.0, 5.0))
    rows = [dict(workload="w", numbers={"ZeRO-2 + EP=2": [ep], "ZeRO-3": [z3]}, pairs={"ZeRO-3": [(ep, z3)]},
                 skipped={}, errors={})]  # fmt: skip
    text = report.table(rows, ["ZeRO-2 + EP=2", "ZeRO-3"], "ZeRO-2 + EP=2", "ZeRO-2 + EP=2 / it")
    assert "ZeRO-2 + EP=2 / it, tok/s" in text and "| w | ZeRO-3 |" in text and "| 2.00-2.00x |" in text


def test_the_plain_loop_peer_trains_and_logs_each_step(tmp_path):
    """peer_train.py's `hf_loop` (what a user writes without a trainer), run here on the tiny model with our
    venv's transformers (the peer's venv pins the same): every step logged, the loss falls from ln(vocab)."""
    from benchmarks import peer_train, workloads

    w = workloads.WORKLOADS["tiny"]
    model_dir = workloads.build_model_dir(w.model, tmp_path)
    raw = workloads.write_rows(w, tmp_path / "raw.jsonl")
    workloads.tokenize_rows(model_dir, raw, w.cutoff_len, tmp_path / "tok.jsonl")
    for profile in workloads.PROFILES:
        out = tmp_path / profile
        out.mkdir()
        settings = workloads.peer_settings(w, "hf_loop", model_dir, tmp_path / "tok.jsonl", out, profile)
        (out / "s.json").write_text(json.dumps(dict(settings, steps=4)))
        peer_train.main(str(out / "s.json"))
        losses = [json.loads(x)["loss"] for x in (out / "steps.jsonl").read_text().splitlines()]
        assert len(losses) == 4 and losses[-1] < losses[0] < 7


def test_alone_runs_one_framework_at_a_time_ours_first_then_last():
    from benchmarks.run import alone_in_turn

    jobs = ["dist_glm", "hf", "trl", "llamafactory"]
    assert alone_in_turn(jobs, 0) == [["dist_glm"], ["hf"], ["trl"], ["llamafactory"]]
    assert alone_in_turn(jobs, 1) == [["hf"], ["trl"], ["llamafactory"], ["dist_glm"]]
    assert alone_in_turn(jobs, 2) == alone_in_turn(jobs, 0)
