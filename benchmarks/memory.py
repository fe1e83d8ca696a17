"""Per-rank memory of model states (parameters + gradients + optimizer states) under each ZeRO stage,
measured on real ranks and set against the ZeRO paper's accounting (Rajbhandari et al., 2020, sec. 3):
with mixed precision and Adam, Ψ parameters cost 2Ψ (bf16 weights) + 2Ψ (bf16 gradients) + 12Ψ (fp32
master weights, momentum, variance) bytes, and on N ranks

    ZeRO-0: (2 + 2 + 12)Ψ    ZeRO-1: (2 + 2)Ψ + 12Ψ/N    ZeRO-2: 2Ψ + (2 + 12)Ψ/N    ZeRO-3: 16Ψ/N

    python launch/benchmark_memory.py               # 2 ranks, the tiny GLM; prints a table
    python launch/benchmark_memory.py --ranks=4 --model=assets/tiny-glm4-0414

Measured = the bytes of every distinct tensor storage alive on the rank after the second backward pass (a
scan of live tensors, so nothing is assumed about DeepSpeed's internals), minus what was alive before
the model existed. It includes what the accounting leaves out (communication buckets, buffers), so
measured >= predicted, by a constant that does not shrink with N.
"""

import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dist_glm.options import Command, option  # noqa: E402

# The ranks' job, set by `main` for the processes the deepspeed launcher starts: model, ds config, result file.
WORKER_ENV = "DIST_GLM_MEMORY_WORKER"

STAGES = ["zero0", "zero1", "zero2", "zero3"]


def predicted_bytes(stage: int, psi: int, n: int) -> float:
    return {0: 16 * psi, 1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n, 3: 16 * psi / n}[stage]


def live_tensor_bytes() -> int:
    import torch

    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type == "meta":
                continue
            storage = obj.untyped_storage()
        except Exception:  # some objects fail isinstance/inspection mid-collection; they hold no tensor
            continue
        if storage.data_ptr() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def worker(model_dir: str, ds_name: str, result_path: str) -> None:
    import torch

    from dist_glm.config import TrainConfig
    from dist_glm.runtime import collectives, deepspeed_config, environment

    environment.use_cpu_accelerator_if_no_gpu()
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM

    from dist_glm.training.optimizer import build_optimizer

    rank, world = environment.init_distributed()
    t = TrainConfig(deepspeed=str(REPO / "ds_configs" / f"{ds_name}.json"), bf16=True, per_device_train_batch_size=1)
    ds_config = deepspeed_config.build_ds_config(t, world)
    # DeepSpeed's defaults keep tensors under 1e5 elements unpartitioned on every rank (all of a tiny
    # model's) and allocate communication buckets of up to 5e8 elements: fine for a 9B model, but they
    # would hide the accounting here. Small buckets and no persistence threshold measure the states.
    ds_config["zero_optimization"].update(
        reduce_bucket_size=10_000,
        allgather_bucket_size=10_000,
        stage3_prefetch_bucket_size=10_000,
        stage3_param_persistence_threshold=0,
        stage3_max_live_parameters=10_000,
        stage3_max_reuse_distance=0,
    )
    gc.collect()
    before = live_tensor_bytes()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).to(torch.bfloat16)
    psi = sum(p.numel() for p in model.parameters())
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, t, False), config=ds_config)
    del model
    ids = torch.randint(0, 100, (1, 16), device=engine.device)
    for step in range(2):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        if step == 1:  # the peak: parameters, this step's gradients and the optimizer states all alive
            del loss
            gc.collect()
            measured = live_tensor_bytes() - before
        engine.step()
    per_rank = collectives.all_gather_objects(measured)
    if rank == 0:
        Path(result_path).write_text(json.dumps({"psi": psi, "per_rank": per_rank}))


@dataclass
class MemoryArgs:
    ranks: int = option(2, "Ranks to measure on.")
    model: str = option(
        str(REPO / "assets" / "tiny-glm4"), "A model directory (its config.json; weights are not read)."
    )


MEMORY = Command(
    prog="benchmark_memory.py",
    usage="benchmark_memory.py [--ranks=2] [--model=assets/tiny-glm4]",
    sections={"memory": (MemoryArgs, None)},
    description=__doc__.splitlines()[0],
)


def run(args: MemoryArgs) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.setdefault("DS_ACCELERATOR", "cuda" if shutil.which("nvidia-smi") else "cpu")
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    rows = []
    for name in STAGES:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [deepspeed, "--no_local_rank", "--num_gpus", str(args.ranks), __file__]
            job = json.dumps([args.model, name, out.name])
            proc = subprocess.run(cmd, env={**env, WORKER_ENV: job}, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            result = json.loads(Path(out.name).read_text())
        stage = int(name[-1])
        predicted = predicted_bytes(stage, result["psi"], args.ranks)
        measured = max(result["per_rank"])
        rows.append((name, result["psi"], predicted, measured))
    mib = 2**20
    print(f"model {args.model}, {args.ranks} ranks, bf16 + Adam; bytes per rank of model states")
    print("| stage | params Ψ | predicted (paper) MiB | measured MiB (max over ranks) | measured / predicted |")
    print("|---|---|---|---|---|")
    for name, psi, predicted, measured in rows:
        print(f"| {name} | {psi:,} | {predicted / mib:.2f} | {measured / mib:.2f} | {measured / predicted:.2f} |")
    return 0


def main(argv: list[str] | None = None) -> None:
    from dist_glm.cli import run_command

    if os.environ.get(WORKER_ENV):  # one of the ranks started by `run`
        worker(*json.loads(os.environ[WORKER_ENV]))
        return
    codes = []
    run_command(MEMORY, argv, lambda s: codes.append(run(s["memory"])))
    sys.exit(codes[0] if codes else 0)


if __name__ == "__main__":
    main()
