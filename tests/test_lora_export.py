"""LoRA under ZeRO-3 exports a real adapter (never shape-[0] placeholders) equal to the ZeRO-0 one,
and PEFT reloads it to the same logits."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_MODEL, base_args, read_metrics, run_train


def lora_args(out, data, **kw):
    return base_args(
        out, data, finetuning_type="lora", lora_rank=4, lora_alpha=8, learning_rate=1e-2, max_steps=8, **kw
    )


@pytest.mark.slow
def test_lora_zero3_adapter_equals_zero0_and_reloads(tmp_path, varlen_data):
    # A saved base model (not from scratch): PEFT adapters are applied to a checkpoint on disk.
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(__import__("transformers").AutoConfig.from_pretrained(TINY_MODEL)).save_pretrained(
        base
    )
    for f in TINY_MODEL.glob("*token*"):
        (base / f.name).write_bytes(f.read_bytes())
    common = {"model_name_or_path": base, "train_from_scratch": False}
    z0, z3 = tmp_path / "z0", tmp_path / "z3"
    run_train(lora_args(z0, varlen_data, **common), nprocs=None)
    run_train(
        lora_args(z3, varlen_data, deepspeed="ds_configs/zero3.json", per_device_train_batch_size=2, **common), nprocs=2
    )

    a0, a3 = load_file(z0 / "adapter_model.safetensors"), load_file(z3 / "adapter_model.safetensors")
    assert a0.keys() == a3.keys() and any("lora_B" in k for k in a0)
    for k in a0:
        assert a3[k].numel() > 0 and a3[k].shape == a0[k].shape, k
        torch.testing.assert_close(a3[k], a0[k], atol=1e-4, rtol=1e-3, msg=k)
    assert any(a0[k].abs().sum() > 0 for k in a0 if "lora_B" in k), "adapter never trained"
    losses = read_metrics(z3, "train/loss")
    assert losses[8] < losses[1]

    from peft import PeftModel

    ids = torch.tensor([[3, 17, 40, 99, 5, 61]])
    logits = {}
    for name, adapter in (("z0", z0), ("z3", z3)):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
        with torch.no_grad():
            logits[name] = model(ids).logits
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        base_logits = plain(ids).logits
    torch.testing.assert_close(logits["z3"], logits["z0"], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits["z3"], base_logits, atol=1e-4), "the adapter changed nothing"
