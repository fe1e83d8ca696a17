"""The checks that need a GPU, as one short script: run it on a machine with CUDA (CI has none).

python launch/gpu_check.py [--steps=100] [--out=out/gpu_check]

fp16 against fp32 on the demo (full and LoRA, ZeRO-1): the final training and eval losses within 5 %,
overflow steps counted. Liger kernels (use_liger_kernel, when liger-kernel is installed) on the tiny
GLM-4-0414: losses within 1 % of the same run without them. Then the tests CI's CPU machine can only
run as refusals (the suite's report lists them under "features this run did not exercise"):
tests/test_kernels.py (flash-attn and Liger against sdpa) and tests/test_fp16.py (fp16 end to end).
Last, a real-shaped small GLM-4.5 MoE (hidden 1024, 32 experts top-4, GLM-4's vocabulary) in bf16: each
experts_implementation on one GPU (tokens/s, peak memory, final loss), and with several GPUs ZeRO-3
against expert parallelism over all of them (`--moe_only` runs just this part).
Prints a table; exits 1 if a check fails, 0 with a note when there is no GPU. (report_to=swanlab, the
other feature CI skips, needs no GPU: install the [swanlab] extra and run tests/test_trackers.py.)
"""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(name: str, out: Path, steps: int, *flags: str) -> dict:
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), str(REPO / "configs" / "demo.yaml")]
    cmd += [f"--output_dir={out / name}", f"--max_steps={steps}", "--eval_steps=0", "--predict_with_generate=false"]
    cmd += [
        "--eval_on_start=false",
        "--save_steps=0",
        "--disable_tqdm=true",
        "--deepspeed=ds_configs/zero1.json",
        *flags,
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stdout + proc.stderr)[-2000:]}
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    train = [r["train/loss"] for r in records if "train/loss" in r]
    overflow = max((r["train/overflow_steps"] for r in records if "train/overflow_steps" in r), default=0)
    return {"train": train[-1], "eval": records[-1].get("eval/loss"), "overflow": overflow}


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (the CPU suite covers the rest)")
        return 0
    args = dict((a.removeprefix("--").split("=", 1) + [""])[:2] for a in sys.argv[1:])
    steps, out = int(args.get("steps", 100)), Path(args.get("out", REPO / "out" / "gpu_check"))
    if "moe_only" in args:
        return moe_check(out, steps)
    rows, failed = [], False
    for method in ("full", "lora"):
        extra = [f"--finetuning_type={method}"] + (["--learning_rate=5e-3"] if method == "lora" else [])
        ref = run(f"{method}_fp32", out, steps, *extra)
        half = run(f"{method}_fp16", out, steps, *extra, "--fp16")
        for name, r in ((f"{method} fp32", ref), (f"{method} fp16", half)):
            if "error" in r:
                print(f"{name} failed:\n{r['error']}")
                failed = True
        if "error" in ref or "error" in half:
            continue
        close = all(abs(half[k] - ref[k]) <= 0.05 * ref[k] for k in ("train", "eval"))
        failed |= not close
        rows.append((method, ref, half, close))
    liger = liger_check(out, steps)
    failed |= liger is not None and not liger[2]
    suite = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py", "tests/test_fp16.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    failed |= suite.returncode != 0
    print(f"\n{torch.cuda.get_device_name()}, {steps} steps of the demo, ZeRO-1")
    print("| method | fp32 train / eval loss | fp16 train / eval loss | fp16 overflow steps | within 5 % |")
    print("|---|---|---|---|---|")
    for method, ref, half, close in rows:
        print(
            f"| {method} | {ref['train']:.4f} / {ref['eval']:.4f} | {half['train']:.4f} / {half['eval']:.4f} | "
            f"{half['overflow']} | {'yes' if close else 'NO'} |"
        )
    if liger is not None:
        plain, fused, close = liger
        print(
            f"\nuse_liger_kernel (tiny GLM-4-0414, fp32): train / eval loss {fused['train']:.4f} / {fused['eval']:.4f}"
            f" vs {plain['train']:.4f} / {plain['eval']:.4f} without; within 1 %: {'yes' if close else 'NO'}"
        )
    summary = (suite.stdout.strip().splitlines() or [f"pytest did not run: {suite.stderr.strip()[-300:]}"])[-1]
    print(f"\ntests/test_kernels.py + tests/test_fp16.py on the GPU: {summary} (they need `make test-fast`'s tools)")
    return 1 if (failed or moe_check(out, steps)) else 0


def moe_model(out: Path) -> Path:
    """A GLM-4.5-shaped MoE small enough for one GPU, built from its config (train_from_scratch)."""
    from transformers import GenerationConfig, Glm4MoeConfig

    path = out / "moe_model"
    tiny = REPO / "assets" / "tiny-glm4-moe"
    config = Glm4MoeConfig(
        vocab_size=151552, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=16, num_key_value_heads=4, head_dim=64, n_routed_experts=32, num_experts_per_tok=4,
        n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5, use_qk_norm=True,
        attention_bias=True, pad_token_id=700, eos_token_id=[700, 707, 709],
    )  # fmt: skip
    config.save_pretrained(path)
    GenerationConfig(eos_token_id=[700, 707, 709], pad_token_id=700).save_pretrained(path)
    for f in tiny.iterdir():
        if f.name.startswith("tokenizer"):
            (path / f.name).write_bytes(f.read_bytes())
    return path


def moe_run(name: str, out: Path, steps: int, ranks: int, *flags: str) -> dict:
    launch = (
        [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={ranks}"] if ranks > 1 else [sys.executable]
    )
    cmd = launch + [str(REPO / "launch" / "train.py"), str(REPO / "configs" / "demo.yaml")]
    cmd += [f"--model_name_or_path={moe_model(out)}", "--train_from_scratch=true", "--finetuning_type=full"]
    cmd += [f"--output_dir={out / name}", f"--max_steps={steps}", "--eval_steps=0", "--predict_with_generate=false"]
    cmd += ["--eval_on_start=false", "--save_steps=0", "--disable_tqdm=true", "--bf16=true", "--template=glm4_0414"]
    cmd += ["--cutoff_len=512", "--per_device_train_batch_size=8", "--logging_steps=5", *flags]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stdout + proc.stderr)[-2000:]}
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    train = train[len(train) // 4 :]  # after the warm-up steps
    return {
        "loss": train[-1]["train/loss"],
        "tokens_per_s": sum(r["train/tokens_per_second"] for r in train) / len(train),
        "memory_gb": max(r.get("train/memory_gb", 0.0) for r in train),
    }


def moe_check(out: Path, steps: int) -> bool:
    """The MoE table; True when a run failed."""
    import torch

    runs = [(f"1 GPU, experts_implementation={impl}", 1, [f"--experts_implementation={impl}"]) for impl in
            ("grouped_mm", "batched_mm", "eager")]  # fmt: skip
    n = torch.cuda.device_count()
    if n > 1 and 32 % n == 0:
        runs += [(f"{n} GPUs, ZeRO-3", n, ["--deepspeed=ds_configs/zero3.json"])]
        runs += [
            (f"{n} GPUs, ZeRO-2 + EP={n}", n, ["--deepspeed=ds_configs/zero2.json", f"--expert_parallel_size={n}"])
        ]
    failed = False
    print(f"\nMoE (GLM-4.5 shape: hidden 1024, 4 layers, 32 experts top-4, vocab 151,552), bf16, {steps} steps, "
          f"micro-batch 8 x 512, {torch.cuda.get_device_name()}")  # fmt: skip
    print("| setting | tokens/s per rank | peak GiB | final loss |\n|---|--:|--:|--:|")
    for i, (name, ranks, flags) in enumerate(runs):
        r = moe_run(f"moe_{i}", out, steps, ranks, *flags)
        if "error" in r:
            print(f"| {name} | failed | | |\n{r['error']}")
            failed = True
        else:
            print(f"| {name} | {r['tokens_per_s']:.0f} | {r['memory_gb']:.2f} | {r['loss']:.4f} |")
    return failed


def liger_check(out: Path, steps: int):
    """(plain, liger, close) on the tiny GLM-4-0414 (Liger patches glm4 models), or None without liger-kernel."""
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        print("liger-kernel is not installed: use_liger_kernel not checked (pip install liger-kernel)")
        return None
    model = f"--model_name_or_path={REPO / 'assets' / 'tiny-glm4-0414'}"
    plain, fused = run("liger_off", out, steps, model), run("liger_on", out, steps, model, "--use_liger_kernel")
    if "error" in plain or "error" in fused:
        print(f"use_liger_kernel check failed:\n{plain.get('error') or fused.get('error')}")
        return plain, fused, False
    return plain, fused, all(abs(fused[k] - plain[k]) <= 0.01 * plain[k] for k in ("train", "eval"))


if __name__ == "__main__":
    sys.exit(main())
