"""bf16 + gradient checkpointing + LoRA under ZeRO-2 on 2 ranks; early stopping agreed by all ranks, on
the eval loss and on a generation metric."""

import json
import math

import pytest

from conftest import base_args, read_metrics, run_train


@pytest.mark.slow
def test_bf16_gradient_checkpointing_lora_zero2(tmp_path, varlen_data):
    run_train(
        base_args(
            tmp_path,
            varlen_data,
            finetuning_type="lora",
            learning_rate=1e-2,
            bf16=True,
            gradient_checkpointing=True,
            deepspeed="ds_configs/zero2.json",
            per_device_train_batch_size=2,
            max_steps=12,
        ),
        nprocs=2,
    )
    losses = read_metrics(tmp_path, "train/loss")
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[12] < losses[1] - 0.3, losses
    assert (tmp_path / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_early_stopping_on_eval_loss(tmp_path, varlen_data):
    # A learning rate this large makes the eval loss rise after the first step, so patience 1 stops
    # the run at the second eval on every rank (a rank that kept going would hang the job).
    run_train(
        base_args(
            tmp_path,
            varlen_data,
            learning_rate=1.0,
            max_grad_norm=0,
            warmup_steps=0,
            max_steps=20,
            eval_dataset=varlen_data,
            eval_steps=1,
            early_stopping_patience=1,
            per_device_train_batch_size=2,
        ),
        nprocs=2,
    )
    results = json.loads((tmp_path / "all_results.json").read_text())
    assert results["global_step"] == 2
    assert sorted(read_metrics(tmp_path, "eval/loss")) == [1, 2]
    assert (tmp_path / "checkpoint-2" / "trainer_state.json").is_file()  # saved when it stopped
    assert (tmp_path / "model.safetensors").is_file()


@pytest.mark.slow
def test_early_stopping_on_a_generation_metric(tmp_path, varlen_data):
    # With 8 new tokens no answer can equal its (longer) reference: exact_match stays 0, the first eval
    # sets the best, the second only ties it (a tie is no improvement), so patience 1 stops at step 2.
    eval_rows = varlen_data.read_text(encoding="utf-8").splitlines()[:4]
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text("\n".join(eval_rows) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    args = base_args(
        out,
        varlen_data,
        max_steps=20,
        eval_dataset=eval_path,
        eval_steps=1,
        predict_with_generate=True,
        generation_max_new_tokens=8,
        metric_for_best_model="exact_match",
        early_stopping_patience=1,
    )
    proc = run_train(args, nprocs=None)
    results = json.loads((out / "all_results.json").read_text())
    assert results["global_step"] == 2 and results["metric_for_best_model"] == "exact_match"
    assert results["best_step"] == 1 and results["best_metric"] == 0.0
    assert "early stopping at step 2: eval exact_match has not improved for 1 evals" in proc.stdout


@pytest.mark.slow
def test_a_failing_final_eval_keeps_the_trained_model(tmp_path, varlen_data, eval_data):
    """The final eval runs after the export; when it fails (here: made to, in a real training process)
    the run exits 1 with the artifact's path, and the artifact is complete."""
    import subprocess
    import sys

    from conftest import REPO, child_env

    args = base_args(tmp_path, varlen_data, max_steps=2, eval_dataset=eval_data)
    script = (
        "import sys; import dist_glm.training.loop as t\n"
        "def broken(*a, **k): raise RuntimeError('eval broke')\n"
        "t.run_eval = broken\n"
        "from dist_glm.cli import train_main; train_main(sys.argv[1:])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"train.py: error: the final evaluation failed; the trained model is saved in {tmp_path}", last
    assert "RuntimeError: eval broke" in proc.stderr  # the cause, for a bug report
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path)  # complete and loadable


@pytest.mark.parametrize(
    "kind, kwargs, lr_at_end",
    [("cosine_with_restarts", {"num_cycles": 2}, 0.0), ("cosine_with_min_lr", {"min_lr_rate": 0.1}, 0.1)],
)
def test_the_hugging_face_schedules_llamafactory_recipes_name(kind, kwargs, lr_at_end):
    import json

    import torch

    from dist_glm.config import load_config
    from dist_glm.training.optimizer import build_scheduler

    base = ["--model_name_or_path=m", "--dataset=d", "--output_dir=o", "--learning_rate=1.0"]
    cfg = load_config([*base, f"--lr_scheduler_type={kind}", f"--lr_scheduler_kwargs={json.dumps(kwargs)}"], None)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = build_scheduler(opt, cfg.train, total_steps=10)
    rates = []
    for _ in range(10):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert rates[0] == 1.0 and abs(opt.param_groups[0]["lr"] - lr_at_end) < 1e-6
    if kind == "cosine_with_restarts":
        assert rates[5] > rates[4]  # the restart half way
    with pytest.raises(Exception, match="needs lr_scheduler_kwargs"):
        load_config([*base, "--lr_scheduler_type=cosine_with_min_lr"], None)
    with pytest.raises(Exception, match=r"lr_scheduler_kwargs=.*cosine_with_restarts takes"):
        load_config([*base, "--lr_scheduler_type=cosine_with_restarts", '--lr_scheduler_kwargs={"num_cycles": "two"}'])
    with pytest.raises(Exception, match=r"lr_scheduler_kwargs=.*linear takes none"):
        load_config([*base, '--lr_scheduler_kwargs={"num_cycles": 2}'], None)


@pytest.mark.parametrize("warmup", [0, 3])
@pytest.mark.parametrize(
    "kind, kwargs",
    [("linear", {}), ("cosine", {}), ("constant", {}), ("constant_with_warmup", {}), ("cosine_with_restarts", {}),
     ("cosine_with_restarts", {"num_cycles": 3}), ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
     ("cosine_with_min_lr", {"min_lr": 0.02, "num_cycles": 0.7})],
)  # fmt: skip
def test_every_schedule_equals_transformers_get_scheduler(kind, kwargs, warmup):
    """Ours (dist_glm.training.optimizer, which does not import transformers.optimization) gives, step for step,
    the learning rate of transformers' get_scheduler for the same name, warmup and arguments."""
    import json

    import torch
    from transformers import get_scheduler

    from dist_glm.config import load_config
    from dist_glm.training.optimizer import build_scheduler

    cfg = load_config(["--model_name_or_path=m", "--dataset=d", "--output_dir=o", "--learning_rate=0.1",
                       f"--warmup_steps={warmup}", f"--lr_scheduler_type={kind}",
                       f"--lr_scheduler_kwargs={json.dumps(kwargs)}"], None)  # fmt: skip
    opts = [torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1) for _ in range(2)]
    ours = build_scheduler(opts[0], cfg.train, total_steps=17)
    theirs = get_scheduler(kind, opts[1], num_warmup_steps=warmup, num_training_steps=17,
                           scheduler_specific_kwargs=kwargs)  # fmt: skip
    for _ in range(20):
        assert opts[0].param_groups[0]["lr"] == pytest.approx(opts[1].param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        for opt, s in zip(opts, (ours, theirs), strict=True):
            opt.step()
            s.step()


@pytest.mark.parametrize("max_norm", [0.5, 1e3, 0.0])
@pytest.mark.parametrize("fused", [True, False])
def test_clipping_gives_clip_grad_norm_then_adamw(max_norm, fused):
    """The loop's clipping (the factor handed to fused AdamW's kernel, or a multiply otherwise) updates the
    weights as torch's clip_grad_norm_ followed by AdamW does, and reports the norm before clipping; a
    non-finite norm leaves the weights and the moments as they were."""
    import torch

    from dist_glm.training.step import clip_gradients

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, fused=fused) for m in models]
    x = torch.randn(8, 16)
    for step in range(3):
        for m in models:
            (m(x).square().sum() * (10.0**step)).backward()
        want = float(torch.nn.utils.clip_grad_norm_(models[1].parameters(), max_norm if max_norm else float("inf")))
        got = clip_gradients(models[0], opts[0], max_norm)
        assert got == pytest.approx(want, rel=1e-6)
        for opt in opts:
            opt.step()
            opt.zero_grad()
        opts[0].grad_scale = None
        for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    before = [p.detach().clone() for p in models[0].parameters()]
    models[0](x).sum().mul(float("nan")).backward()
    assert math.isnan(clip_gradients(models[0], opts[0], max_norm))
    opts[0].step()
    assert all(torch.equal(a, b) for a, b in zip(before, models[0].parameters(), strict=True))
