"""The side-by-side training benchmark: ours against HF Trainer, TRL's SFTTrainer and LLaMA-Factory.

For each workload, every framework starts from the same saved weights on the same rows with the same
workload settings (1 process, fp32, AdamW, constant lr, batch, cutoff, no eval, no saving), and in each
round all of them run at the same time, so they share the machine's load; ratios are taken within a
round. Two tables (workloads.PROFILES): "defaults", every framework as its users run it (its own
optimizer implementation, checkpointing and dataloader), and "matched", the same optimizer kernel and no
checkpointing for all. The settings each framework ran with are printed under the tables.
"""

import dataclasses
import json
import math
import os
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

from benchmarks import measure, peers, report, workloads
from benchmarks.workloads import PROFILES
from dist_glm.errors import UserError
from dist_glm.options import Command, option

OURS = "dist_glm"


@dataclass
class BenchArgs:
    workloads: str = option(
        ",".join(workloads.WORKLOADS),
        "Comma-separated workloads: "
        + "; ".join(f"{w.name} ({w.about})" for w in workloads.WORKLOADS.values())
        + ". Default: all.",
    )
    peers: str = option("hf,trl,llamafactory", f"Comma-separated peers, from: {', '.join(peers.PEERS)}; or none.")
    profiles: str = option(
        ",".join(PROFILES),
        "Comma-separated: defaults (each framework at its own defaults) and/or matched (the same optimizer "
        "kernel, no gradient checkpointing).",
    )
    rounds: int = option(3, "Rounds; in each, ours and every peer run at the same time (or in turn: --alone).")
    alone: bool = option(
        False,
        "Run each framework alone on the machine, in turn (the order reversed every other round), instead of all "
        "at once: tokens/s as one training on the machine gets it, not a share of the CPU decided by how many "
        "threads each framework keeps runnable.",
    )
    steps: int = option(0, "Optimizer steps per run (0 = the workload's own count).")
    loss_step: int = option(0, "The step whose loss the table prints for every framework (0 = the last step).")
    cache_dir: str = option("~/.cache/dist_glm_bench", "Peer venvs, model directories, run logs.")
    output: str = option("", "Also write the table (markdown) and the setup lines to this file.")
    round_timeout_s: int = option(3600, "A round still running after this many seconds is killed.")
    memory_headroom_gib: float = option(2.0, "Free memory left aside for the rest of the machine when sizing a round.")


BENCH = Command(
    prog="benchmark.py",
    usage="benchmark.py [--workloads=tiny,real_full,...] [--peers=hf,trl,llamafactory|none] [--rounds=3]",
    sections={"bench": (BenchArgs, None)},
    description=__doc__.splitlines()[0],
)


def _names(value: str, known: dict, flag: str) -> list[str]:
    names = [] if value.strip() == "none" else [n.strip() for n in value.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad:
        raise UserError(
            f"--{flag}: unknown {', '.join(bad)}; choose from {', '.join(known)}"
            + ("" if flag == "workloads" else " or none")
        )
    return names


def check_args(a: BenchArgs) -> tuple[list[str], list[str], list[str]]:
    wl, ps = _names(a.workloads, workloads.WORKLOADS, "workloads"), _names(a.peers, peers.PEERS, "peers")
    problems = [] if wl else ["--workloads: name at least one workload"]
    profiles = _names(a.profiles, dict.fromkeys(PROFILES), "profiles")
    if not profiles:
        problems.append("--profiles: name defaults, matched or both")
    if a.rounds < 1:
        problems.append(f"--rounds={a.rounds}: must be at least 1")
    if a.steps and a.steps < 3:
        problems.append(f"--steps={a.steps}: must be at least 3 (the first step is left out of throughput)")
    if a.steps and a.loss_step > a.steps:
        problems.append(f"--loss_step={a.loss_step} is past --steps={a.steps}: lower it or raise --steps")
    if problems:
        raise UserError(problems)
    return wl, ps, profiles


def child_env() -> dict:
    """The same environment for every framework: offline (nothing is downloaded), CPU accelerator for
    DeepSpeed where no GPU exists, and no PYTHONPATH reaching our checkout from a peer."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("DS_ACCELERATOR", "cuda" if shutil.which("nvidia-smi") else "cpu")
    return env


def build_jobs(
    w, model_dir: Path, data_dir: Path, pythons: dict, run_root: Path, log_root: Path, profile: str = "defaults"
) -> list:
    """Ours reads the raw rows, LLaMA-Factory its registry of them, HF/TRL our tokenization of them (TRL's
    DPOTrainer the raw pairs, which it renders with the tokenizer's chat template)."""
    import yaml

    env, jobs = child_env(), []
    ours_dir, rows, lf_data = run_root / OURS, data_dir / "tokenized.jsonl", data_dir / "llamafactory"
    if w.stage == "dpo":
        rows = data_dir / "raw.jsonl"
    ours = workloads.ours_command(w, model_dir, data_dir / "raw.jsonl", ours_dir)
    jobs.append(measure.Job(OURS, ours, ours_dir / "metrics.jsonl",
                            log_root / f"{OURS}.log", env))  # fmt: skip
    script = Path(__file__).with_name("peer_train.py")
    for name, python in pythons.items():
        out = run_root / name
        out.mkdir(parents=True, exist_ok=True)
        if name == "llamafactory":
            recipe = workloads.llamafactory_config(w, model_dir, lf_data, out, profile)
            (out / "recipe.yaml").write_text(yaml.safe_dump(recipe))
            cmd, step_log = (
                [str(python.parent / "llamafactory-cli"), "train", str(out / "recipe.yaml")],
                "trainer_log.jsonl",
            )
        else:
            settings = workloads.peer_settings(w, name, model_dir, rows, out, profile)
            (out / "settings.json").write_text(json.dumps(settings))
            cmd, step_log = [str(python), str(script), str(out / "settings.json")], "steps.jsonl"
        jobs.append(measure.Job(name, cmd, out / step_log, log_root / f"{name}.log", env, cwd=str(out)))
    return jobs


def groups_that_fit(jobs: list, per_job_gib: float, headroom_gib: float, log) -> list[list]:
    """All jobs at once when memory allows; otherwise as many at a time as fit (ours in every group, so
    each ratio is still taken between runs that shared the machine)."""
    import psutil

    free = psutil.virtual_memory().available / report.GIB - headroom_gib
    fit = max(2, int(free // per_job_gib))
    if fit >= len(jobs):
        return [jobs]
    log(f"only {free:.1f} GiB free: running ours with {fit - 1} peer(s) at a time instead of all {len(jobs)} together")
    ours, rest = jobs[0], jobs[1:]
    return [[ours, *rest[i : i + fit - 1]] for i in range(0, len(rest), fit - 1)]


def alone_in_turn(jobs: list, round_index: int) -> list[list]:
    """--alone: one job at a time; ours (jobs[0]) first in the 1st, 3rd, ... round and last in the others, so a
    machine that speeds up or slows down during a round favours neither side over the rounds."""
    order = jobs if round_index % 2 == 0 else [*jobs[1:], jobs[0]]
    return [[job] for job in order]


def mfu_line(mine: list, model_dir: Path, rows: Path, before, after) -> str:
    """Ours' MFU per CPU-second (the runs share the CPU; a CPU-second can do at most one thread's matmul
    rate): at the usual 6N FLOP/token, and at the FLOPs ours does, which apply the LM head only at labelled
    tokens. `before`/`after`: the reference measured before and after the rounds (report.mfu_text)."""
    body, head = report.matmul_params(str(model_dir))
    labels = [json.loads(line)["labels"] for line in open(rows, encoding="utf-8")]
    labelled = sum(sum(x != -100 for x in r) for r in labels) / sum(len(r) for r in labels)
    per_cpu_s = statistics.median(n.tokens_per_cpu_second for n in mine)
    # Where ours does far fewer FLOPs than 6N (the head at few labelled tokens), 6N can exceed the core's rate
    # although the reference is sound: then it is the FLOP count, not the reference, that does not fit.
    fewer = "as ours does fewer FLOPs than 6N (see the next figure)" if labelled < 0.5 else ""
    model_mfu = report.mfu_text(per_cpu_s * 6 * (body + head), before, after, fewer)
    done_mfu = report.mfu_text(per_cpu_s * 6 * (body + head * labelled), before, after)
    return (
        f"ours at {per_cpu_s:.0f} tok per CPU-s (median); N = {(body + head) / 1e6:.1f}M matmul parameters "
        f"({head / 1e6:.1f}M of them the LM head): MFU at 6N FLOP/token {model_mfu}; at the FLOPs ours "
        f"does (LM head at the {100 * labelled:.0f} % labelled tokens only) {done_mfu}"
    )


def floor_line(model_dir: Path) -> str:
    """The memory no fp32 full fine-tuning with AdamW goes below: weights, gradients and two moments, 16 bytes
    per parameter (the checkpoint's fp32 tensors are 4)."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    floor = 16 * n / report.GIB
    return f"model states floor (fp32 weights, gradients, AdamW moments: 16 bytes x {n / 1e6:.1f}M) = {floor:.2f} GiB"


def settings_lines(profile: str, frameworks: list[str], defaults: dict) -> list[str]:
    """What each framework ran with beyond the workload, in `profile`: the optimizer implementation and
    activation checkpointing, each marked as the framework's own default or as set by the benchmark."""
    lines = []
    for fw in frameworks:
        if fw == OURS:
            lines.append(
                f"  - {OURS}: fp32 (the workload's), optimizer adamw_torch_fused (its default), gradient "
                "checkpointing off (its default)"
            )
            continue
        given, own = workloads.peer_overrides(fw, profile), defaults.get(fw, {})
        gc_given = given.get("gradient_checkpointing", None)
        if "disable_gradient_checkpointing" in given:
            gc_given = not given["disable_gradient_checkpointing"]
        optim = f"{given['optim']} (set)" if "optim" in given else f"{own.get('optim', '?')} (its default)"
        gc = own.get("gradient_checkpointing") if gc_given is None else gc_given
        gc_text = {True: "on", False: "off", None: "?"}[gc] + (" (set)" if gc_given is not None else " (its default)")
        fp32 = "fp32 (the workload's: bf16 and fp16 set off)"
        lines.append(f"  - {fw}: {fp32}, optimizer {optim}, gradient checkpointing {gc_text}")
    return lines


PROFILE_TITLES = {
    "defaults": "As users run them: every framework at its own defaults beyond the workload",
    "matched": "Same settings: the same optimizer kernel (adamw_torch_fused) and no gradient checkpointing for all",
}


def bench(a: BenchArgs, log=print) -> str:
    names, peer_names, profiles = check_args(a)
    cache = Path(a.cache_dir).expanduser().resolve()
    pythons, skipped, lines, defaults = {}, {}, [], {}
    for n in peer_names:
        python, how = peers.ensure_venv(cache, peers.PEERS[n], log)
        if python is None:
            skipped[n] = how
        else:
            pythons[n] = python
            defaults[n] = peers.peer_defaults(python, n)
            lines.append(f"- {peers.PEERS[n].label} ({n}): {peers.peer_version_report(python)}")
    lines.insert(0, f"- {OURS} (ours): {peers.ours_versions()}")
    before = report.matmul_reference()
    sections, mfu_lines = [], []
    chosen = [workloads.WORKLOADS[n] for n in names]
    if a.steps:
        chosen = [dataclasses.replace(w, steps=a.steps) for w in chosen]
    for profile in profiles if any(not w.layouts for w in chosen) else ():
        rows = []
        for w in (w for w in chosen if not w.layouts):
            wname = w.name
            row, mine, model_dir, data_dir = run_workload(a, w, profile, pythons, skipped, cache, log)
            rows.append(row)
            if mine and not w.lora:
                mfu_lines.append((profile, wname, mine, model_dir, data_dir / "tokenized.jsonl"))
        settings = "\n".join(settings_lines(profile, [OURS, *pythons], defaults))
        sections.append(
            f"### {PROFILE_TITLES[profile]}{' (each framework alone on the machine, in turn)' if a.alone else ''}"
            f"\n\n{report.table(rows, [OURS, *peer_names], OURS)}\n\nSettings:\n{settings}"
        )
    for w in (w for w in chosen if w.layouts):
        row = run_layouts(a, w, cache, log)
        labels = [label for label, _ in w.layouts]
        flags = "\n".join(f"  - {label}: {' '.join(extra)}" for label, extra in w.layouts)
        sections.append(
            f"### Ours in {len(labels)} layouts on {w.ranks} ranks (each alone on the machine, in turn; no peer "
            f"runs this workload)\n\n{report.table([row], labels, labels[0], f'{labels[0]} / it')}\n\n"
            f"Settings: fp32, the global batch of {w.batch_size} rows split over {w.ranks} ranks; peak RSS is all "
            f"ranks and the launcher together; beyond that:\n{flags}"
        )
    after = report.matmul_reference()
    lines.append(
        f"- fp32 matmul reference, one thread (1024x1024): {before.best / 1e9:.1f} GFLOP/s before the rounds "
        f"(tries {100 * before.spread:.0f} % apart), {after.best / 1e9:.1f} after ({100 * after.spread:.0f} % apart)"
    )
    for profile, wname, mine, model_dir, tokenized in mfu_lines:
        lines.append(f"- {wname} ({profile}): " + mfu_line(mine, model_dir, tokenized, before, after))
    for w in (w for w in chosen if not w.lora and w.stage == "sft" and not w.layouts):
        lines.append(f"- {w.name}: " + floor_line(workloads.build_model_dir(w.model, cache)))
    text = "\n\n".join(sections) + "\n\n" + "\n".join(lines)
    if a.output:
        Path(a.output).write_text(text + "\n", encoding="utf-8")
    return text


def prepare_data(w, cache: Path) -> tuple[Path, Path, Path, list[int]]:
    """A workload's model directory, its data folder, its raw rows and their token counts (ours' tokenization)."""
    model_dir = workloads.build_model_dir(w.model, cache)
    data_dir = cache / "data" / f"{w.model}-{w.cutoff_len}-prompt{w.prompt_repeat}-{w.stage}"
    data_dir.mkdir(parents=True, exist_ok=True)
    raw = workloads.write_rows(w, data_dir / "raw.jsonl")
    lengths = workloads.tokenize_rows(model_dir, raw, w.cutoff_len, data_dir / "tokenized.jsonl", w.stage)
    return model_dir, data_dir, raw, lengths


def run_workload(a: BenchArgs, w, profile: str, pythons: dict, skipped: dict, cache: Path, log):
    """Every round of one workload in one profile: (table row, ours' Numbers, model dir, data dir)."""
    if w.stage == "dpo":  # HF Trainer (and a plain SFT loop) has no preference training
        without = {n for n in ("hf", "hf_loop") if n in pythons}
        pythons = {n: p for n, p in pythons.items() if n not in without}
        skipped = dict(skipped, **{n: "no preference training in HF Trainer" for n in without})
    model_dir, data_dir, raw, lengths = prepare_data(w, cache)
    workloads.write_llamafactory_data(raw, data_dir / "llamafactory", w.stage)
    tokens_per_step = w.batch_size * statistics.mean(lengths)
    loss_step = a.loss_step or w.steps
    got: dict[str, list] = {OURS: [], **{n: [] for n in pythons}}
    errors: dict[str, str] = {}
    pairs: dict[str, list] = {n: [] for n in pythons}
    for r in range(a.rounds):
        run_root = cache / "runs" / f"{w.name}-{profile}"
        log_root = cache / "logs" / f"{w.name}-{profile}-round{r + 1}"
        shutil.rmtree(run_root, ignore_errors=True)
        log_root.mkdir(parents=True, exist_ok=True)
        jobs = build_jobs(w, model_dir, data_dir, pythons, run_root, log_root, profile)
        groups = alone_in_turn(jobs, r) if a.alone else groups_that_fit(jobs, w.rss_gib, a.memory_headroom_gib, log)
        this_round: dict = {}
        for group in groups:
            how = "alone" if len(group) == 1 else "together"
            log(f"{w.name} ({profile}) round {r + 1}/{a.rounds}: {', '.join(j.label for j in group)} {how} "
                f"({w.steps} steps)")  # fmt: skip
            results = measure.run_together(group, a.round_timeout_s)
            # The raw marks, so a table can be recomputed (or checked) without running again.
            marks = log_root / f"results-{'-'.join(j.label for j in group)}.json"
            marks.write_text(json.dumps([dataclasses.asdict(res) for res in results], indent=1))
            together = {res.label: report.numbers(res, tokens_per_step, loss_step) for res in results}
            this_round.update(together)
            for res in results:
                got[res.label].append(together[res.label])
                if res.label != OURS and not a.alone:
                    pairs[res.label].append((together[OURS], together[res.label]))
                if res.error:
                    errors[res.label] = res.error
                    log(f"  {res.label}: {res.error}")
        if a.alone:
            for name in pythons:
                pairs[name].append((this_round[OURS], this_round[name]))
        shutil.rmtree(run_root, ignore_errors=True)  # final models (ours saves one) are not kept
    row = dict(workload=f"{w.name} (batch {w.batch_size}, cutoff {w.cutoff_len}, {w.steps} steps, loss at "
               f"step {loss_step}; {tokens_per_step:.0f} non-pad tok/step)", about=w.about, numbers=got,
               skipped=skipped, errors=errors, pairs=pairs)  # fmt: skip
    return row, [n for n in got[OURS] if n], model_dir, data_dir


def run_layouts(a: BenchArgs, w, cache: Path, log) -> dict:
    """Each of ours' layouts of a multi-rank workload, one at a time (its ranks have the whole machine);
    ratios are the first layout over each other within a round, the rounds alternating the order."""
    model_dir, data_dir, raw, lengths = prepare_data(w, cache)
    tokens_per_step, loss_step = w.batch_size * statistics.mean(lengths), a.loss_step or w.steps
    labels = [label for label, _ in w.layouts]
    got, errors, pairs = {n: [] for n in labels}, {}, {n: [] for n in labels[1:]}
    for r in range(a.rounds):
        log_root = cache / "logs" / f"{w.name}-round{r + 1}"
        log_root.mkdir(parents=True, exist_ok=True)
        this_round = {}
        for label, extra in w.layouts if r % 2 == 0 else reversed(w.layouts):
            run_dir = cache / "runs" / w.name / label.replace(" ", "").replace("+", "_")
            shutil.rmtree(run_dir, ignore_errors=True)
            cmd = workloads.ours_command(w, model_dir, raw, run_dir, extra)
            job = measure.Job(label, cmd, run_dir / "metrics.jsonl", log_root / f"{run_dir.name}.log",
                              child_env(), cwd=str(workloads.REPO))  # fmt: skip
            log(f"{w.name} round {r + 1}/{a.rounds}: {label} ({w.ranks} ranks, {w.steps} steps)")
            (res,) = measure.run_together([job], a.round_timeout_s)
            (log_root / f"results-{run_dir.name}.json").write_text(json.dumps(dataclasses.asdict(res), indent=1))
            this_round[label] = report.numbers(res, tokens_per_step, loss_step)
            got[label].append(this_round[label])
            if res.error:
                errors[label] = res.error
                log(f"  {label}: {res.error}")
            shutil.rmtree(run_dir, ignore_errors=True)
        for label in labels[1:]:
            pairs[label].append((this_round[labels[0]], this_round[label]))
    return dict(workload=f"{w.name} (global batch {w.batch_size}, cutoff {w.cutoff_len}, {w.steps} steps, loss at "
                f"step {loss_step}; {tokens_per_step:.0f} non-pad tok/step)", about=w.about, numbers=got,
                skipped={}, errors=errors, pairs=pairs)  # fmt: skip
