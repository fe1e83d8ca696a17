"""Attention kernels and NEFTune: sdpa and eager give the same losses (padded and packed rows), an
unavailable kernel is refused before launch, and NEFTune noise touches training embeddings only."""

import pytest
import torch

from dist_glm.config import ModelConfig, load_config
from dist_glm.data.batching import Example, collate, model_inputs
from dist_glm.data.packing import pack_examples
from dist_glm.data.template import IGNORE_INDEX
from dist_glm.models.loading import add_neftune, check_attention, check_liger, load_model
from dist_glm.objectives.cross_entropy import token_loss_sum
from tests.conftest import TINY_MODEL


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


def test_flash_attention_without_its_package_or_gpu_is_refused_with_the_fix():
    cfg = load_config(
        ["--model_name_or_path=m", "--dataset=d", "--output_dir=o", "--attn_implementation=flash_attention_2"], None
    )
    (problem,) = check_attention(cfg.model)  # this machine has neither flash-attn nor a GPU
    assert problem.startswith("attn_implementation=flash_attention_2 needs") and "sdpa" in problem
    assert check_attention(load_config(["--model_name_or_path=m", "--dataset=d", "--output_dir=o"], None).model) == []


def test_liger_kernel_where_it_cannot_run_is_refused_with_the_fix():
    import importlib.util

    base = ["--model_name_or_path=assets/tiny-glm4-0414", "--dataset=d", "--output_dir=o"]
    assert check_liger(load_config(base, None).model) == []
    (problem,) = check_liger(load_config(base + ["--use_liger_kernel"], None).model)
    if importlib.util.find_spec("liger_kernel") is None:  # this project's CI machine
        assert problem == "use_liger_kernel needs the liger-kernel package (pip install liger-kernel on a CUDA machine)"
    elif not torch.cuda.is_available():
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
