"""Attention kernels and NEFTune: sdpa and eager give the same losses (padded and packed rows); flash-attn
and Liger compute the plain loss where they can run (a CUDA GPU with the package: launch/gpu_check.py runs
this file there) and are refused before launch, with the fix, where they cannot; NEFTune noise touches
training embeddings only."""

import pytest
import torch

from dist_glm.config import ModelConfig, load_config
from dist_glm.data.batching import Example, collate, model_inputs
from dist_glm.data.packing import pack_examples
from dist_glm.data.template import IGNORE_INDEX
from dist_glm.models.loading import add_neftune, check_attention, check_liger, load_model
from dist_glm.objectives.cross_entropy import token_loss_sum
from tests.conftest import TINY_MODEL, not_exercised


def rows():
    g = torch.Generator().manual_seed(0)
    out = []
    for n, prompt in ((20, 8), (13, 3), (27, 11), (9, 2)):
        ids = torch.randint(0, 700, (n,), generator=g).tolist()
        out.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:], [], ""))
    return out


def model_with(attn: str):
    cfg = ModelConfig(model_name_or_path=str(TINY_MODEL), train_from_scratch=True, attn_implementation=attn)
    return load_model(cfg, {}, torch.float32, seed=3).eval()


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_sdpa_and_eager_give_the_same_loss(packed):
    examples = pack_examples(rows(), 64) if packed else rows()
    batch = collate(examples, pad_id=700)
    losses = {}
    for attn in ("sdpa", "eager"):
        model = model_with(attn)
        assert model.config._attn_implementation == attn
        with torch.no_grad():
            losses[attn] = float(token_loss_sum(model, model_inputs(batch), batch["labels"])[0])
    assert losses["sdpa"] == pytest.approx(losses["eager"], rel=1e-5)


def has(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def gpu_loss(model_dir: str, **model_kwargs) -> float:
    cfg = ModelConfig(model_name_or_path=model_dir, train_from_scratch=True, **model_kwargs)
    model = load_model(cfg, {}, torch.bfloat16, seed=3).to("cuda").eval()
    if model_kwargs.get("use_liger_kernel"):
        from dist_glm.models.loading import apply_liger

        apply_liger(model)
    batch = {k: v.to("cuda") for k, v in collate(rows(), pad_id=700).items()}
    with torch.no_grad():
        return float(token_loss_sum(model, model_inputs(batch), batch["labels"])[0])


def test_flash_attention_runs_where_it_can_and_is_refused_with_the_fix_elsewhere():
    base = ["--model_name_or_path=m", "--dataset=d", "--output_dir=o"]
    assert check_attention(load_config(base, None).model) == []
    problems = check_attention(load_config(base + ["--attn_implementation=flash_attention_2"], None).model)
    if has("flash_attn") and torch.cuda.is_available():  # the feature itself: accepted, and it computes sdpa's loss
        assert problems == []
        flash = gpu_loss(str(TINY_MODEL), attn_implementation="flash_attention_2")
        assert flash == pytest.approx(gpu_loss(str(TINY_MODEL), attn_implementation="sdpa"), rel=2e-2)  # bf16
    else:  # CI's CPU machine: refused before launch, naming what is missing and what works instead
        not_exercised("flash-attn (attn_implementation=flash_attention_2)", "needs a CUDA GPU and flash-attn")
        (problem,) = problems
        missing = "the flash-attn package" if not has("flash_attn") else "a CUDA GPU"
        assert problem.startswith(f"attn_implementation=flash_attention_2 needs {missing}") and "sdpa" in problem


def test_liger_kernel_runs_where_it_can_and_is_refused_with_the_fix_elsewhere():
    base = ["--model_name_or_path=assets/tiny-glm4-0414", "--dataset=d", "--output_dir=o"]
    assert check_liger(load_config(base, None).model) == []
    problems = check_liger(load_config(base + ["--use_liger_kernel"], None).model)
    if has("liger_kernel") and torch.cuda.is_available():  # the feature itself: Liger's loss is the plain one
        assert problems == []
        liger = gpu_loss("assets/tiny-glm4-0414", use_liger_kernel=True)
        assert liger == pytest.approx(gpu_loss("assets/tiny-glm4-0414"), rel=2e-2)  # bf16
        # A model type Liger does not patch is refused even here.
        other = ["--model_name_or_path=assets/tiny-glm4", "--dataset=d", "--output_dir=o", "--use_liger_kernel"]
        (problem,) = check_liger(load_config(other, None).model)
        assert "Liger patches GLM-4-0414 models" in problem
    elif not has("liger_kernel"):  # CI's CPU machine
        not_exercised("Liger kernels (use_liger_kernel)", "need a CUDA GPU and liger-kernel")
        assert problems == [
            "use_liger_kernel needs the liger-kernel package (pip install liger-kernel on a CUDA machine)"
        ]
    else:
        not_exercised("Liger kernels (use_liger_kernel)", "need a CUDA GPU")
        (problem,) = problems
        assert problem.startswith("use_liger_kernel needs a CUDA GPU")


def test_neftune_noises_training_embeddings_only():
    batch = collate(rows(), pad_id=700)
    plain, noisy = model_with("sdpa"), model_with("sdpa")
    add_neftune(noisy, alpha=5.0)
    with torch.no_grad():
        reference = plain(**model_inputs(batch)).logits
        assert torch.equal(noisy(**model_inputs(batch)).logits, reference)  # eval: no noise
        noisy.train()
        first, second = noisy(**model_inputs(batch)).logits, noisy(**model_inputs(batch)).logits
    assert not torch.allclose(first, reference) and not torch.allclose(first, second)  # fresh noise each step
    embeddings = noisy.get_input_embeddings()
    out = embeddings(batch["input_ids"])
    bound = 5.0 / (out.size(1) * out.size(2)) ** 0.5
    assert (out - embeddings.weight[batch["input_ids"]]).abs().max() <= bound + 1e-6  # |noise| <= alpha/sqrt(L*d)
