"""Packing: per-sample losses of a packed batch equal the same samples unpacked; 1 rank = 2 ranks."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import TINY_MODEL, train_one_and_two_ranks
from dist_glm.config import DataConfig
from dist_glm.data.batching import Example, collate, model_inputs
from dist_glm.data.converters import load_conversations
from dist_glm.data.packing import pack_examples
from dist_glm.data.template import IGNORE_INDEX, build_template


def per_token_losses(model, batch):
    logits = model(**model_inputs(batch)).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return loss, labels != IGNORE_INDEX


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_per_sample_losses_equal_unpacked(varlen_data, attn):
    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    template = build_template("glm4", tok)
    convs = load_conversations(str(varlen_data), DataConfig(), [])[:12]
    examples = [Example(e.input_ids, e.labels, [], "") for e in (template.encode(c, 96) for c in convs)]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_MODEL), attn_implementation=attn).eval()

    packed = pack_examples(examples, capacity=160)
    assert len(packed) < len(examples)  # several samples really share rows
    with torch.no_grad():
        loss, mask = per_token_losses(model, collate(packed, tok.pad_token_id))
        unpacked = {}
        for e in examples:
            single, m = per_token_losses(model, collate([e], tok.pad_token_id))
            unpacked[tuple(e.input_ids)] = single[m]
    # Walk each packed row sample by sample (positions restart at 0) and compare token losses.
    seen = 0
    for row, example in enumerate(packed):
        starts = [i for i, p in enumerate(example.position_ids) if p == 0] + [len(example.input_ids)]
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            key = tuple(example.input_ids[a:b])
            got = loss[row, a : b - 1][mask[row, a : b - 1]]
            torch.testing.assert_close(got, unpacked[key], atol=1e-5, rtol=1e-5)
            seen += 1
    assert seen == len(examples)


@pytest.mark.slow
def test_packed_training_same_losses_on_1_and_2_ranks(tmp_path, varlen_data):
    common = dict(packing=True, cutoff_len=96, max_steps=6, data_cache_dir=tmp_path / "cache")
    _, _, a, b, stdout = train_one_and_two_ranks(tmp_path, varlen_data, "zero2", **common)
    assert sorted(a) == list(range(1, 7)) and max(abs(a[s] - b[s]) for s in a) < 2e-5
    assert "with packing" in stdout and "packing: 96 samples into" in stdout
