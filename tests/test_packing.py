"""Packing: per-sample losses of a packed batch equal the same samples unpacked; 1 rank = 2 ranks."""

import json

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


def test_packing_default_is_resolved_in_data_and_never_written_back(tmp_path):
    # Raw text packs by default, except for a method that trains one sample per row (P-tuning: packed
    # samples would share one prefix). The default was once written back into the config after the
    # method's checks had run, so P-tuning on raw text with packing unset packed anyway.
    from dist_glm.config import load_config
    from dist_glm.data.loading import load_datasets
    from dist_glm.methods import get_method
    from dist_glm.models.loading import load_tokenizer
    from tests.conftest import TINY_MODEL

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": "类型#裙 颜色#红色 " * (i + 3)}) + "\n" for i in range(12)))
    tokenizer = load_tokenizer(str(TINY_MODEL))
    base = [f"--model_name_or_path={TINY_MODEL}", f"--dataset={data}", f"--output_dir={tmp_path / 'o'}"]
    for method, packs in (("ptuning", False), ("lora", True), ("full", True)):
        cfg = load_config(base + [f"--finetuning_type={method}", "--cutoff_len=64"], None)
        assert get_method(method).check_config(cfg) == []  # packing unset: nothing to refuse up front
        loaded = load_datasets(cfg, tokenizer, get_method(method).can_pack)
        assert loaded.packed is packs, method
        assert cfg.data.packing is None, "the resolved default must not be written back into the config"
        assert len(loaded.train) < len(loaded.samples) if packs else loaded.train is loaded.samples
    cfg = load_config(base + ["--finetuning_type=ptuning", "--packing=true"], None)
    (problem,) = get_method("ptuning").check_config(cfg)  # asked for explicitly: refused before anything loads
    assert problem.startswith("packing=true with finetuning_type=ptuning")
