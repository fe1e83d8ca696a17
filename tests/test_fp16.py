"""fp16 mixed precision with DeepSpeed's dynamic loss scaling: the config plumbing, the refusals, and
real runs on CPU (DeepSpeed's CPU accelerator runs fp16 under ZeRO 1-3): close to fp32, overflow steps
counted and kept away from the non-finite guard, the scaler's state resumed exactly."""

import math
import shutil

import pytest
import torch

from dist_glm.config import load_config
from dist_glm.errors import UserError
from dist_glm.runtime.deepspeed_config import build_ds_config
from tests.conftest import NOT_EXERCISED, base_args, read_metrics, run_train

REQUIRED = ["--model_name_or_path=m", "--dataset=d", "--output_dir=o"]


def test_fp16_fills_the_loss_scaling_knobs_from_the_training_config(tmp_path):
    cfg = load_config(REQUIRED + ["--fp16", "--deepspeed=ds_configs/zero2.json", "--fp16_initial_scale_power=12"])
    ds = build_ds_config(cfg.train, world_size=2)
    assert ds["fp16"] == {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 12,
        "loss_scale_window": 1000,
        "hysteresis": 2,
        "min_loss_scale": 1.0,
    }
    assert ds["bf16"] == {"enabled": False} and cfg.train.dtype == torch.float16
    # A value written in the ds config is kept; "auto" takes ours.
    own = tmp_path / "ds.json"
    own.write_text('{"zero_optimization": {"stage": 1}, "fp16": {"enabled": "auto", "hysteresis": 4}}')
    cfg = load_config(REQUIRED + ["--fp16", f"--deepspeed={own}"])
    assert build_ds_config(cfg.train, 1)["fp16"]["hysteresis"] == 4
    assert build_ds_config(load_config(REQUIRED).train, 1)["fp16"] == {"enabled": False}


def test_fp16_refusals_name_the_fix():
    with pytest.raises(UserError) as err:
        load_config(REQUIRED + ["--fp16", "--bf16"])
    assert any(p.startswith("bf16 and fp16 are both set") for p in err.value.problems)
    with pytest.raises(UserError) as err:
        build_ds_config(load_config(REQUIRED + ["--fp16"]).train, 1)  # no --deepspeed: ZeRO-0
    assert "fp16 needs zero_optimization.stage 1, 2 or 3" in str(err.value) and "zero1.json" in str(err.value)


def test_qlora_computes_in_the_training_precision():
    from dist_glm.methods import qlora

    for flag, dtype in (("--fp16", torch.float16), ("--bf16", torch.bfloat16), ("--seed=1", torch.float32)):
        q = qlora.quantization_config(load_config(REQUIRED + ["--finetuning_type=qlora", flag]))
        assert q.bnb_4bit_compute_dtype == dtype


def fp16_args(out, data, **extra):
    return base_args(out, data, deepspeed="ds_configs/zero1.json", max_steps=8, **extra)


def fp16_here() -> bool:
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


def test_fp16_on_a_machine_without_fp16_kernels_is_refused_before_launch():
    from dist_glm.training.checks import check_fp16_here

    cfg = load_config(["--model_name_or_path=m", "--dataset=d", "--output_dir=o", "--fp16"], None)
    problems = check_fp16_here(cfg.train)
    if fp16_here():
        assert problems == []
    else:  # e.g. this project's AMD EPYC CI machines: AVX-512 with bf16 but without FP16
        (line,) = problems
        assert line.startswith("fp16=true: this machine's accelerator (cpu) has no fp16 support") and "bf16" in line


@pytest.mark.slow
@pytest.mark.skipif(
    not fp16_here(),
    reason=NOT_EXERCISED + "fp16 training end to end: DeepSpeed's accelerator here has no fp16 kernels "
    "(a CPU without AVX512-FP16)",
)
def test_fp16_trains_close_to_fp32_counts_overflows_and_resumes_its_scale(tmp_path, varlen_data):
    fp32, fp16 = tmp_path / "fp32", tmp_path / "fp16"
    run_train(fp16_args(fp32, varlen_data), nprocs=None)
    # A first scale of 2**24 overflows a few times before it settles: those updates are skipped.
    proc = run_train(fp16_args(fp16, varlen_data, fp16=True, fp16_initial_scale_power=24, save_steps=4), nprocs=None)
    overflows = read_metrics(fp16, "train/overflow_steps")
    assert overflows and list(overflows.values()) == list(range(1, len(overflows) + 1)), overflows
    assert (
        not read_metrics(fp16, "train/skipped_steps") and "fp16 gradients overflowed" in proc.stdout
    )  # not the guard's
    scales = read_metrics(fp16, "train/loss_scale")
    assert min(scales.values()) < 2**24 and all(math.log2(s).is_integer() for s in scales.values())
    a, b = read_metrics(fp32, "train/loss"), read_metrics(fp16, "train/loss")
    assert set(b) == set(range(1, 9)) - set(overflows)  # a skipped update logs no training loss

    # Without overflows (a small first scale), fp16 follows fp32 to fp16 round-off.
    calm = tmp_path / "calm"
    run_train(fp16_args(calm, varlen_data, fp16=True, fp16_initial_scale_power=8), nprocs=None)
    c = read_metrics(calm, "train/loss")
    assert sorted(c) == list(range(1, 9)) and all(abs(c[s] - a[s]) < 2e-2 * a[s] for s in a), (a, c)

    # Resumed from step 4, the scale and the losses continue as in the uninterrupted run.
    resumed = tmp_path / "resumed"
    args = fp16_args(resumed, varlen_data, fp16=True, fp16_initial_scale_power=24, save_steps=4)
    shutil.copytree(fp16 / "checkpoint-4", resumed / "checkpoint-4")
    run_train(args + [f"--resume_from_checkpoint={resumed / 'checkpoint-4'}"], nprocs=None)
    r = read_metrics(resumed, "train/loss")
    assert {s: v for s, v in r.items() if s > 4} == pytest.approx({s: v for s, v in b.items() if s > 4}, abs=1e-6)
    assert read_metrics(resumed, "train/loss_scale")[8] == scales[8]
