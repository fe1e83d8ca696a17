"""Freeze tuning and LoRA variants: what trains, equality across ranks/stages, artifacts that reload."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import TINY_MODEL, base_args, read_metrics, run_train, train_one_and_two_ranks
from dist_glm.config import load_config
from dist_glm.errors import UserError
from dist_glm.methods import count_parameters, get_method

REQUIRED = ["--model_name_or_path=m", "--dataset=d.jsonl", "--output_dir=o"]


def tiny_model(seed=7):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_MODEL))


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freeze_trains_only_the_chosen_layers_and_modules():
    cfg = load_config(
        REQUIRED
        + [
            "--finetuning_type=freeze",
            "--freeze_trainable_layers=1",
            "--freeze_trainable_modules=mlp",
            "--freeze_extra_modules=lm_head",
        ]
    )
    model = get_method("freeze").make_trainable(tiny_model(), cfg)
    assert trainable_names(model) == {
        "model.layers.3.mlp.gate_up_proj.weight",
        "model.layers.3.mlp.down_proj.weight",
        "lm_head.weight",
    }
    cfg = load_config(REQUIRED + ["--finetuning_type=freeze", "--freeze_trainable_layers=-2"])
    names = trainable_names(get_method("freeze").make_trainable(tiny_model(), cfg))
    assert names and all(n.startswith(("model.layers.0.", "model.layers.1.")) for n in names)


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--freeze_trainable_layers=5"], r"freeze_trainable_layers=5: the model has 4 layers"),
        (["--freeze_trainable_modules=mlpp"], r"freeze_trainable_modules: no parameter is named like \['mlpp'\]"),
    ],
)
def test_freeze_errors_name_the_fix(flags, match):
    cfg = load_config(REQUIRED + ["--finetuning_type=freeze", *flags])
    with pytest.raises(UserError, match=match):
        get_method("freeze").make_trainable(tiny_model(), cfg)


def test_lora_variants_and_bad_targets():
    cfg = load_config(
        REQUIRED
        + [
            "--finetuning_type=lora",
            "--use_rslora",
            "--use_dora",
            "--lora_target=q_proj,v_proj",
            "--lora_modules_to_save=lm_head",
        ]
    )
    model = get_method("lora").make_trainable(tiny_model(), cfg)
    names = trainable_names(model)
    assert any("lora_magnitude_vector" in n for n in names)  # DoRA
    assert any("lm_head.modules_to_save" in n for n in names)
    assert not any("k_proj" in n for n in names)
    trainable, total = count_parameters(model)
    assert 0 < trainable < total
    cfg = load_config(REQUIRED + ["--finetuning_type=lora", "--lora_target=qq_proj"])
    with pytest.raises(UserError, match="lora_target"):
        get_method("lora").make_trainable(tiny_model(), cfg)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_targets_are_checked_against_the_model_before_it_loads(method):
    """From config.json alone (a meta-device model), so a typo costs a second, not a 9B load per rank."""
    flags = [f"--model_name_or_path={TINY_MODEL}", "--dataset=d", "--output_dir=o", f"--finetuning_type={method}"]
    check = get_method(method).check_config
    bad = load_config(flags + ["--lora_target=q_proj,qq_proj", "--lora_modules_to_save=lm_haed"])
    problems = [p for p in check(bad) if "train_from_scratch" not in p]
    assert len(problems) == 2, problems
    assert problems[0].startswith("lora_target: qq_proj is not a module name") and "q_proj" in problems[0]
    assert problems[1].startswith("lora_modules_to_save: lm_haed is not a module name") and "lm_head" in problems[1]
    for spelling in ("all", "all-linear", "q_proj,v_proj"):
        good = load_config(flags + [f"--lora_target={spelling}", "--lora_modules_to_save=lm_head"])
        assert [p for p in check(good) if "train_from_scratch" not in p] == []


def test_lora_target_all_is_all_linear():
    """LLaMA-Factory's spelling: every linear layer but the head, as PEFT's all-linear."""
    cfg = load_config(REQUIRED + ["--finetuning_type=lora", "--lora_target=all"])
    names = trainable_names(get_method("lora").make_trainable(tiny_model(), cfg))
    for module in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"):
        assert any(f"{module}.lora_A" in n for n in names), module
    assert not any("lm_head" in n for n in names)


@pytest.mark.slow
def test_freeze_zero3_two_ranks_matches_single_process_and_keeps_frozen_weights(tmp_path, varlen_data):
    common = dict(
        finetuning_type="freeze",
        freeze_trainable_layers=1,
        freeze_extra_modules="lm_head",
        max_steps=6,
        learning_rate=5e-3,
    )
    _, three, a, b, _ = train_one_and_two_ranks(tmp_path, varlen_data, "zero3", **common)
    assert max(abs(a[s] - b[s]) for s in a) < 2e-5 and a[6] < a[1]
    init = dict(tiny_model(seed=7).named_parameters())  # base_args trains from scratch with seed 7
    got, ref = load_file(three / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, ref[name], atol=1e-4, rtol=1e-3)
        changed = not torch.equal(tensor, init[name].detach())
        assert changed == (name.startswith("model.layers.3.") or name == "lm_head.weight"), name


@pytest.mark.slow
def test_freeze_resume_continues_the_loss_curve(tmp_path, varlen_data):
    common = dict(
        finetuning_type="freeze",
        freeze_trainable_layers=2,
        lr_scheduler_type="constant_with_warmup",
        save_steps=3,
        per_device_train_batch_size=2,
    )
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train(base_args(straight, varlen_data, max_steps=6, **common), nprocs=2)
    run_train(base_args(split, varlen_data, max_steps=3, **common), nprocs=2)
    run_train(base_args(split, varlen_data, max_steps=6, resume_from_checkpoint="auto", **common), nprocs=2)
    a, b = read_metrics(straight, "train/loss"), read_metrics(split, "train/loss")
    assert sorted(b) == list(range(1, 7)) and max(abs(a[s] - b[s]) for s in a) < 1e-6


@pytest.mark.slow
def test_rslora_dora_modules_to_save_match_across_ranks_and_reload(tmp_path, varlen_data):
    common = dict(
        finetuning_type="lora",
        use_rslora=True,
        use_dora=True,
        lora_modules_to_save="lm_head",
        learning_rate=1e-2,
        max_steps=6,
    )
    _, two, a, b, _ = train_one_and_two_ranks(tmp_path, varlen_data, "zero2", **common)
    assert max(abs(a[s] - b[s]) for s in a) < 2e-5 and a[6] < a[1]
    adapter = load_file(two / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in k for k in adapter) and any("lm_head" in k for k in adapter)
    from peft import PeftModel

    base = tiny_model(seed=7)
    model = PeftModel.from_pretrained(base, two).eval()
    ids = torch.tensor([[3, 17, 40, 99]])
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, tiny_model(seed=7)(ids).logits, atol=1e-4)


@pytest.mark.slow
def test_ptuning_two_ranks_zero3_checkpointing_matches_single_process(tmp_path, varlen_data, pretrained_tiny):
    """ChatGLM-6B's P-tuning v2 scripts were reported to change the loss under data parallelism; ours
    does not, also with ZeRO-3 partitioning the prefix encoder and gradient checkpointing on."""
    common = dict(
        model_name_or_path=pretrained_tiny,
        train_from_scratch=False,
        finetuning_type="ptuning",
        pre_seq_len=8,
        prefix_projection=True,
        prefix_hidden_size=32,
        learning_rate=1e-2,
        max_steps=6,
        gradient_checkpointing=True,
    )
    one, two, a, b, stdout = train_one_and_two_ranks(tmp_path, varlen_data, "zero3", **common)
    assert sorted(b) == list(range(1, 7)) and max(abs(a[s] - b[s]) for s in a) < 2e-5 and a[6] < a[1]
    assert re.search(r"method=ptuning trainable params [\d,]+ / [\d,]+", stdout)
    # The artifact is the prefix alone (8 tokens x 4 layers x 2 x 64 KV width, fp32), not the model.
    prefix = load_file(two / "adapter_model.safetensors")
    assert list(prefix) == ["prompt_embeddings"] and prefix["prompt_embeddings"].shape == (8, 4 * 2 * 64)
    torch.testing.assert_close(
        prefix["prompt_embeddings"],
        load_file(one / "adapter_model.safetensors")["prompt_embeddings"],
        atol=1e-4,
        rtol=1e-3,
    )
    assert not (two / "model.safetensors").exists()


@pytest.mark.slow
def test_qlora_8bit_adapter_reloads_with_its_quantization(tmp_path, varlen_data, pretrained_tiny):
    from dist_glm.models.artifacts import load_for_inference

    out = tmp_path / "q8"
    run_train(
        base_args(
            out,
            varlen_data,
            model_name_or_path=pretrained_tiny,
            train_from_scratch=False,
            finetuning_type="qlora",
            quantization_bit=8,
            lora_rank=4,
            learning_rate=1e-2,
            max_steps=4,
        ),
        nprocs=None,
    )
    quant = json.loads((out / "quantization_config.json").read_text())
    assert quant["load_in_8bit"] is True and quant["load_in_4bit"] is False
    model = load_for_inference(str(out))
    assert type(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear8bitLt"
    ids = torch.tensor([[3, 17, 40, 99]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize(
    "flags,match",
    [
        (
            ["--finetuning_type=qlora", "--train_from_scratch"],
            r"qlora quantizes pretrained weights.*use finetuning_type=lora",
        ),
        (["--finetuning_type=ptuning", "--packing"], r"packing=true with finetuning_type=ptuning.*set packing=false"),
        (["--finetuning_type=qlora", "--quantization_bit=3"], r"quantization_bit=3 is not supported; use one of 4, 8"),
    ],
)
@pytest.mark.slow
def test_unsupported_method_combinations_are_refused_up_front(tmp_path, varlen_data, flags, match):
    args = base_args(tmp_path / "o", varlen_data) + flags
    proc = run_train(args, nprocs=None, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.search(match, proc.stderr + proc.stdout), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_run_that_loads_no_quantized_weights_leaves_bitsandbytes_out(tmp_path, monkeypatch):
    """PEFT imports bitsandbytes (and with it torch's inductor) whenever it is installed; a LoRA run on a plain
    checkpoint marks it absent, so neither happens. Kept for QLoRA, a named adapter (its base may have been
    trained quantized) and a checkpoint that carries a quantization_config."""
    import sys

    from dist_glm.models.loading import leave_out_bitsandbytes

    quantized = tmp_path / "quantized"
    quantized.mkdir()
    config = json.loads((TINY_MODEL / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"load_in_4bit": True}}))
    cases = {
        "lora": ([f"--model_name_or_path={TINY_MODEL}", "--finetuning_type=lora"], True),
        "full": ([f"--model_name_or_path={TINY_MODEL}", "--finetuning_type=full"], True),
        "qlora": ([f"--model_name_or_path={TINY_MODEL}", "--finetuning_type=qlora"], False),
        "adapter": ([f"--model_name_or_path={TINY_MODEL}", f"--adapter_name_or_path={tmp_path}"], False),
        "quantized": ([f"--model_name_or_path={quantized}", "--finetuning_type=lora"], False),
    }
    for name, (flags, left_out) in cases.items():
        monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
        cfg = load_config([*flags, "--dataset=d.jsonl", "--output_dir=o"], None)
        assert leave_out_bitsandbytes(cfg, get_method(cfg.method.finetuning_type)) is left_out, name
        assert (sys.modules.get("bitsandbytes", "absent") is None) is left_out, name


@pytest.mark.slow
def test_peft_lora_trains_in_a_process_that_left_bitsandbytes_out():
    """In a fresh process: PEFT's LoRA works without bitsandbytes, and torch's inductor is not imported."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom dist_glm.config import load_config\nfrom dist_glm.methods import get_method\n"
        "from dist_glm.models.loading import leave_out_bitsandbytes\n"
        f"cfg = load_config(['--model_name_or_path={TINY_MODEL}', '--dataset=d', '--output_dir=o'], None)\n"
        "assert leave_out_bitsandbytes(cfg, get_method('lora'))\n"
        "import peft, torch\nfrom transformers import AutoConfig, AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained('{TINY_MODEL}'))\n"
        "m = peft.get_peft_model(m, peft.LoraConfig(r=2, target_modules='all-linear'))\n"
        "m(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()\n"
        "print(sorted(k for k in ('bitsandbytes', 'torch._inductor.compile_fx') if sys.modules.get(k)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=TINY_MODEL.parent.parent)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]
