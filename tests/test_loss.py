"""The loss path that runs the LM head only at labelled positions, in recomputed chunks, against the
plain full-logits computation: same loss sums and same gradients (fp32), for full and LoRA, packed and
unpacked rows, one chunk and many. ZeRO-3 and several ranks are covered by test_zero_equivalence, which
compares those runs with ZeRO-0 through this same path."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dist_glm.data.batching import Example, collate, model_inputs
from dist_glm.data.packing import pack_examples
from dist_glm.data.template import IGNORE_INDEX
from dist_glm.objectives import cross_entropy

TINY = Path(__file__).resolve().parent.parent / "assets" / "tiny-glm4"


def tiny_model(vocab_size: int | None = None, layers: int = 2):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(TINY)
    config.num_hidden_layers, config.use_cache = layers, False
    if vocab_size:
        config.vocab_size = vocab_size
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float()


def sft_examples(vocab: int, n: int = 4, seed: int = 1) -> list[Example]:
    """Variable-length rows whose first part (the prompt) has no labels, like chat SFT data."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt, answer = 5 + 3 * i, 4 + 2 * i
        ids = torch.randint(0, vocab, (prompt + answer,), generator=g).tolist()
        out.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:], ids[:prompt], ""))
    return out


def loss_and_grads(model, batch, chunked: bool):
    model.zero_grad(set_to_none=True)
    inputs = model_inputs(batch)
    if chunked:
        total, count = cross_entropy.token_loss_sum(model, inputs, batch["labels"])
    else:
        total = cross_entropy.plain_token_loss_sum(model(**inputs).logits, batch["labels"])
        count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(total.detach()), count, grads


def assert_same(model, batch):
    ref_loss, ref_count, ref_grads = loss_and_grads(model, batch, chunked=False)
    got_loss, got_count, got_grads = loss_and_grads(model, batch, chunked=True)
    assert got_count == ref_count > 0
    assert got_loss == pytest.approx(ref_loss, rel=1e-6, abs=1e-5)
    assert got_grads.keys() == ref_grads.keys() and ref_grads
    for name, ref in ref_grads.items():
        # fp32 round-off of a different summation order grows with the size of what is summed: the
        # absolute tolerance follows the tensor's scale (an embedding row sums many tokens' gradients).
        atol = 1e-6 * max(1.0, float(ref.abs().max()))
        torch.testing.assert_close(got_grads[name], ref, rtol=1e-5, atol=atol, msg=name)


def lora(model):
    from dist_glm.methods import get_method

    cfg = SimpleNamespace(
        method=SimpleNamespace(
            lora_rank=4,
            lora_alpha=8.0,
            lora_dropout=0.0,
            lora_target="all-linear",
            use_rslora=False,
            use_dora=False,
            lora_modules_to_save="lm_head",
        )
    )
    torch.manual_seed(0)
    model = get_method("lora").make_trainable(model, cfg)
    for n, p in model.named_parameters():  # B starts at zero: perturb it so every gradient is non-trivial
        if "lora_B" in n:
            p.data.normal_(0, 0.02)
    return model


@pytest.mark.parametrize("chunk_tokens", [None, 3], ids=["one-chunk", "many-chunks"])
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_chunked_head_equals_plain_loss_and_gradients(monkeypatch, method, packed, chunk_tokens):
    model = tiny_model()
    if chunk_tokens:
        monkeypatch.setattr(cross_entropy, "CHUNK_ELEMENTS", chunk_tokens * model.config.vocab_size)
    if method == "lora":
        model = lora(model)
    examples = sft_examples(model.config.vocab_size if method == "full" else 714)
    if packed:
        examples = pack_examples(examples, 40)
    batch = collate(examples, pad_id=0)
    assert_same(model, batch)


def test_real_vocabulary_in_many_chunks():
    """GLM-4's 151,552 entries: more labelled tokens than one chunk holds, so chunks and their
    recomputation are exercised at the real width."""
    model = tiny_model(vocab_size=151_552, layers=1)
    chunk = cross_entropy.CHUNK_ELEMENTS // model.config.vocab_size
    examples = sft_examples(151_552, n=2)
    examples[0] = Example(list(range(chunk * 2)), [IGNORE_INDEX] * 10 + list(range(10, chunk * 2)), [], "")
    assert_same(model, collate(examples, pad_id=0))


def test_a_batch_without_labels_keeps_the_graph():
    model = tiny_model()
    batch = collate([Example([1, 2, 3, 4], [IGNORE_INDEX] * 4, [], "")], pad_id=0)
    total, count = cross_entropy.token_loss_sum(model, model_inputs(batch), batch["labels"])
    total.backward()  # every rank runs the same backward even when its micro-batch has nothing to learn
    assert count == 0 and float(total) == 0.0


def test_head_is_restored_and_eval_needs_no_grad():
    model = tiny_model()
    batch = collate(sft_examples(714, n=2), pad_id=0)
    with torch.no_grad():
        total, _ = cross_entropy.token_loss_sum(model, model_inputs(batch), batch["labels"])
        ref = cross_entropy.plain_token_loss_sum(model(**model_inputs(batch)).logits, batch["labels"])
    assert "forward" not in model.lm_head.__dict__
    assert float(total) == pytest.approx(float(ref), rel=1e-6)
    assert model(**model_inputs(batch)).logits.shape[-1] == 714  # the model computes logits again


def test_config_matches_the_asset():
    assert json.loads((TINY / "config.json").read_text())["vocab_size"] == 714
