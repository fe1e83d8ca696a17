"""ChatGLM-6B (THUDM's first ChatGLM) in dist_glm's own implementation (dist_glm/models/chatglm6b.py and
chatglm6b_tokenizer.py), checked against THUDM's code's own outputs kept as data (tests/data/chatglm/, SOURCES.md):
the logits its modeling_chatglm.py computed on the recipe's tiny weights, and the ids its tokenization_chatglm.py
gave on assets/tiny-chatglm-6b/ice_text.model. Beyond those: generation with the KV cache, packing and padding
(each equal to the plain computation), dist_glm's loss on the LM head, gradient checkpointing and a save/load
round trip under THUDM's weight names.
"""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from test_chatglm_layouts import recipe_weights, reference, unpack

from conftest import REPO
from dist_glm.models.chatglm6b import (
    ChatGLM6BConfig,
    ChatGLM6BForCausalLM,
    chatglm6b_positions,
    published_config,
    register_auto_classes,
    visible_keys,
)
from dist_glm.models.chatglm6b_tokenizer import build_chatglm6b_tokenizer

DATA = REPO / "tests" / "data" / "chatglm"
ASSET = REPO / "assets" / "tiny-chatglm-6b"


def published_directory(path, config: dict, shards: int = 1):
    """A directory as THUDM published ChatGLM-6B: config.json and the recipe's weights under THUDM's names in
    pytorch_model*.bin (sharded with an index when `shards` > 1), the saved rotary buffers included."""
    ref = reference("chatglm")
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    shapes = dict(ref["state_dict_shapes"])
    if config["vocab_size"] != ref["tiny_config"]["vocab_size"]:
        hidden = config["hidden_size"]
        shapes.update({"lm_head.weight": [config["vocab_size"], hidden]})
        shapes.update({"transformer.word_embeddings.weight": [config["vocab_size"], hidden]})
    weights = recipe_weights(shapes)
    weights.update({name: torch.zeros(4) for name in ref["derived"]})  # recomputed, so any value does
    if shards == 1:
        torch.save(weights, path / "pytorch_model.bin")
        return path
    names, index = sorted(weights), {}
    for k in range(shards):
        file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: weights[n] for n in names[k::shards]}, path / file)
        index.update(dict.fromkeys(names[k::shards], file))
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return path


@pytest.fixture(scope="module")
def reference_model(tmp_path_factory):
    path = published_directory(tmp_path_factory.mktemp("chatglm6b"), reference("chatglm")["tiny_config"], shards=2)
    return ChatGLM6BForCausalLM.from_pretrained(str(path), config=published_config(path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def asset_model(tmp_path_factory):
    """The tiny asset's config (its tokenizer's ids) with the recipe's weights."""
    path = tmp_path_factory.mktemp("asset") / "chatglm-6b"
    shutil.copytree(ASSET, path)
    published_directory(path, json.loads((ASSET / "config.json").read_text()))
    return ChatGLM6BForCausalLM.from_pretrained(str(path), config=published_config(path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return build_chatglm6b_tokenizer(ASSET)


def assert_logits_equal_reference(logits: torch.Tensor, expected: dict) -> None:
    head, logsumexp = unpack(expected)
    np.testing.assert_allclose(logits[..., :256].double().numpy(), head, atol=1e-5, rtol=0)
    np.testing.assert_allclose(torch.logsumexp(logits.double(), -1).numpy(), logsumexp, atol=1e-4, rtol=0)


def test_logits_equal_thudm_code(reference_model):
    """fp32, every position: the first 256 logits to 1e-5 and the log-sum-exp over the vocabulary to 1e-4, with
    THUDM's positions and mask given, and computed by the model from the ids alone (as THUDM's forward does)."""
    for case in reference("chatglm")["cases"]:
        ids = torch.tensor(case["input_ids"])
        positions, context, sample = chatglm6b_positions(ids, reference_model.config)
        assert positions.tolist() == case["position_ids"]
        real = torch.ones_like(ids, dtype=torch.bool)
        hidden_by_thudm = torch.tensor(case["attention_mask"], dtype=torch.bool)  # True = masked out
        assert torch.equal(visible_keys(context, sample, real, real[:, :0]), ~hidden_by_thudm)
        with torch.no_grad():
            assert_logits_equal_reference(reference_model(ids).logits, case["logits"])
            given = reference_model(ids, position_ids=torch.tensor(case["position_ids"])).logits
            assert_logits_equal_reference(given, case["logits"])


def test_state_dict_has_thudm_names(reference_model):
    expected = set(reference("chatglm")["state_dict_shapes"])
    assert set(reference_model.state_dict()) == expected
    assert {n: list(t.shape) for n, t in reference_model.state_dict().items()} == reference("chatglm")[
        "state_dict_shapes"
    ]


def greedy_without_cache(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=-1)
    return ids


def test_generate_with_cache_equals_full_forward(asset_model, tokenizer):
    """Greedy `generate` (KV cache, positions recomputed per step) gives the tokens that full forward passes
    without a cache give; a left-padded batch gives each row's tokens alone."""
    prompts = ["类型#裤子*颜色#红色", "Hello world, 这款连衣裙采用棉质面料"]
    for prompt in prompts:
        ids = tokenizer([prompt], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            cached = asset_model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
        assert cached.tolist() == greedy_without_cache(asset_model, ids, 8).tolist()
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        together = asset_model.generate(**batch, max_new_tokens=8, do_sample=False, eos_token_id=None)
    for row, prompt in zip(together, prompts, strict=True):
        ids = tokenizer([prompt], return_tensors="pt")["input_ids"]
        assert row[-8:].tolist() == greedy_without_cache(asset_model, ids, 8)[0, -8:].tolist()
    with pytest.raises(ValueError, match="position_ids given to generate"):
        asset_model.generate(ids, position_ids=torch.zeros(1, 2, ids.shape[1], dtype=torch.long), max_new_tokens=1)


def sample_ids(tokenizer, prompt: str, reply: str) -> list[int]:
    """A training row as the chatglm template builds it: prompt [gMASK] <sop> reply <eop>."""
    reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"] + reply_ids + [tokenizer.eos_token_id]


def test_padding_and_packing_change_nothing(asset_model, tokenizer):
    """A sample's logits are the same alone, left-padded, right-padded (dist_glm's collate) and packed with
    others behind restarting 1-D position ids (dist_glm's packing, a pad segment last)."""
    a = sample_ids(tokenizer, "类型#裤子*颜色#红色", "这款红色裤子")
    b = sample_ids(tokenizer, "Hello", "碎花图案点缀")
    with torch.no_grad():
        alone = [asset_model(torch.tensor([s])).logits[0] for s in (a, b)]
        pad = 3
        n = len(a) - len(b)
        left = asset_model(torch.tensor([[pad] * n + b]), attention_mask=torch.tensor([[0] * n + [1] * len(b)]))
        right = asset_model(torch.tensor([b + [pad] * n]), attention_mask=torch.tensor([[1] * len(b) + [0] * n]))
        packed_ids = torch.tensor([a + b + [pad] * 3])
        positions = torch.tensor([list(range(len(a))) + list(range(len(b))) + list(range(3))])
        packed = asset_model(packed_ids, position_ids=positions).logits[0]
    torch.testing.assert_close(left.logits[0, n:], alone[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(right.logits[0, : len(b)], alone[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[: len(a)], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[len(a) : len(a) + len(b)], alone[1], atol=1e-5, rtol=0)


def test_positions_of_packed_samples(tokenizer):
    """Per sample: positions pinned to its [gMASK] from <sop> on, block positions 1, 2, ... from <sop>; a sample
    without <sop> (a pad segment) is plain causal text."""
    config = ChatGLM6BConfig(mask_token_id=200, gmask_token_id=201, bos_token_id=204, eos_token_id=205)
    ids = torch.tensor([[7, 201, 204, 9, 205, 8, 8, 201, 204, 9, 3, 3]])
    local = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]])
    positions, context, sample = chatglm6b_positions(ids, config, sample_positions=local)
    assert positions.tolist() == [[[0, 1, 1, 1, 1, 0, 1, 2, 2, 2, 0, 1], [0, 0, 1, 2, 3, 0, 0, 0, 1, 2, 0, 0]]]
    assert context.int().tolist() == [[1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0]]
    visible = visible_keys(context, sample, torch.ones_like(context), context[:, :0])[0, 0]
    assert not visible[:5, 5:].any() and not visible[5:, :5].any()  # samples never see each other
    assert visible[0, 1] and not visible[2, 3]  # context both ways, the reply causal


def test_lm_head_is_batch_first_for_dist_glm_losses(asset_model, tokenizer):
    """dist_glm's cross-entropy runs the LM head on labelled positions only by replacing the `lm_head(hidden)`
    call (B x T x H); the sum equals the plain one over full logits."""
    from dist_glm.objectives.cross_entropy import labelled_loss_sum, plain_token_loss_sum, sums_from_head

    batch = tokenizer(["类型#裤子*颜色#红色这款", "Hello world 碎花"], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    inputs = {**batch, "use_cache": False}
    vocab = asset_model.config.vocab_size
    with torch.no_grad():
        head = sums_from_head(asset_model, inputs, lambda h, x: labelled_loss_sum(h, x, labels, vocab), 1)
        plain = plain_token_loss_sum(asset_model(**inputs).logits, labels)
    torch.testing.assert_close(head[0], plain, atol=1e-4, rtol=1e-6)


def test_gradient_checkpointing_recomputes_and_keeps_gradients(tmp_path):
    torch.manual_seed(0)
    model = ChatGLM6BForCausalLM(published_config(ASSET)).float()
    ids = torch.tensor([[7, 20, 30, 201, 204, 40, 50, 205]])

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    model.train()
    plain = grads()
    calls = []
    hook = model.transformer.layers[0].attention.register_forward_hook(lambda *_: calls.append(1))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = grads()
    hook.remove()
    assert len(calls) == 2  # the forward, and its recomputation in backward
    for g, h in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(g, h)


def test_unsupported_configs_are_refused():
    for key, value, match in (
        ("quantization_bit", 4, "quantization_bit: 4"),
        ("pre_seq_len", 128, "pre_seq_len: 128"),
        ("position_encoding_2d", False, "position_encoding_2d"),
    ):
        with pytest.raises(ValueError, match=match):
            ChatGLM6BConfig(**{key: value})


def tokenizer_reference() -> dict:
    ref = json.loads((DATA / "tokenization_chatglm.json").read_text(encoding="utf-8"))
    sha = hashlib.sha256((ASSET / "ice_text.model").read_bytes()).hexdigest()
    assert sha == ref["tokenizer_file_sha256"], "assets/tiny-chatglm-6b/ice_text.model changed: regenerate the data"
    return ref


def test_tokenizer_ids_equal_thudm_tokenizer(tokenizer):
    ref = tokenizer_reference()
    for case in ref["strings"]:
        text = case["text"]
        assert tokenizer.encode(text) == case["encode"], text
        assert tokenizer.encode(text, add_special_tokens=False) == case["encode_no_special"], text
        assert tokenizer.convert_ids_to_tokens(case["encode_no_special"]) == case["tokens"], text
        assert tokenizer.decode(case["encode_no_special"]) == case["decode_no_special"], text
        assert tokenizer.decode(case["encode"]) == case["decode_encode"], text
        assert tokenizer.decode(case["encode"], skip_special_tokens=True) == case["decode_encode_skip_special"], text
    for case in ref["extra_strings"]:
        assert tokenizer.encode(case["text"]) == case["encode"], case["text"]
        assert tokenizer.decode(case["encode"]) == case["decode_encode"], case["text"]
        skipped = tokenizer.decode(case["encode"], skip_special_tokens=True)
        assert skipped == case["decode_encode_skip_special"], case["text"]
    for name, prompt in ref["chat"].items():
        assert tokenizer([prompt["prompt"]])["input_ids"][0] == prompt["input_ids"], name
    # THUDM's build_inputs_with_special_tokens for a pair: ids_0 [gMASK] <sop> ids_1 <eop>
    assert tokenizer.encode(*ref["pair"]["text"]) == ref["pair"]["encode"]


def test_tokenizer_special_tokens_and_padding(tokenizer, asset_model):
    """THUDM's special ids and registered special tokens; left padding with <pad>. THUDM's `_pad` also returns
    2-D positions and a square mask: the model computes the same from the ids and the plain padding mask."""
    ref = tokenizer_reference()
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in ref["special_ids"]} == ref["special_ids"]
    assert sorted(tokenizer.all_special_tokens) == sorted(ref["all_special_tokens"])
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id) == (
        ref["pad_token_id"], ref["eos_token_id"], ref["unk_token_id"], ref["bos_token_id"],
    )  # fmt: skip
    assert tokenizer.padding_side == ref["padding_side"] and tokenizer.vocab_size == ref["vocab_size"]
    thudm = ref["batch_padding"]
    batch = tokenizer(["hi", "Hello world, 你好"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == thudm["input_ids"]
    real = batch["attention_mask"].bool()
    assert torch.equal(real, batch["input_ids"] != tokenizer.pad_token_id)
    positions, context, sample = chatglm6b_positions(batch["input_ids"], asset_model.config, batch["attention_mask"])
    expected = torch.tensor(thudm["position_ids"])
    assert torch.equal(positions.permute(0, 2, 1)[real], expected.permute(0, 2, 1)[real])
    visible = visible_keys(context, sample, real, real[:, :0])[:, 0]
    hidden_by_thudm = torch.tensor(thudm["attention_mask"])[:, 0]
    for row in range(len(real)):  # a real token's row; THUDM hides everything from pads' rows
        keys = real[row]
        assert torch.equal(visible[row][keys][:, keys], ~hidden_by_thudm[row][keys][:, keys])
        assert not visible[row][keys][:, ~keys].any()


def test_tokenizer_saves_and_loads(tmp_path, tokenizer):
    from transformers import PreTrainedTokenizerFast

    tokenizer.save_pretrained(tmp_path)
    loaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    for case in tokenizer_reference()["strings"] + tokenizer_reference()["extra_strings"]:
        assert loaded.encode(case["text"]) == case["encode"], case["text"]
        assert loaded.decode(case["encode"]) == case["decode_encode"], case["text"]
    assert loaded(["hi", "Hello"], padding=True)["input_ids"] == tokenizer(["hi", "Hello"], padding=True)["input_ids"]


def test_tokenizer_refuses_ids_config_json_disagrees_with(tmp_path):
    """Without tokenizer_config.json's num_image_tokens: 0, THUDM's tokenizer shifts every id by 20000."""
    shutil.copytree(ASSET, tmp_path / "chatglm-6b")
    (tmp_path / "chatglm-6b" / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match="num_image_tokens"):
        build_chatglm6b_tokenizer(tmp_path / "chatglm-6b")


@pytest.mark.slow
def test_training_smoke_and_save_round_trip(tmp_path, tokenizer):
    """A few AdamW steps with gradient checkpointing lower the loss; save_pretrained writes THUDM's weight names,
    which from_pretrained reads back exactly."""
    torch.manual_seed(0)
    model = ChatGLM6BForCausalLM(published_config(ASSET)).float()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    rows = [
        sample_ids(tokenizer, "类型#裤子*颜色#红色", "这款红色裤子"),
        sample_ids(tokenizer, "类型#上衣", "百搭又大方"),
    ]
    width = max(map(len, rows))
    ids = torch.tensor([[3] * (width - len(r)) + r for r in rows])
    mask = (ids != 3).long()
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    model.save_pretrained(tmp_path / "saved")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert set(saved) == set(reference("chatglm")["state_dict_shapes"])
    register_auto_classes()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    assert type(loaded) is ChatGLM6BForCausalLM
    assert all(torch.equal(t, loaded.state_dict()[n]) for n, t in model.state_dict().items())


@pytest.mark.slow
def test_published_chatglm6b_trains_on_two_zero3_ranks_and_serves(tmp_path, varlen_data):
    """LoRA from a ChatGLM-6B directory as THUDM published it (its Python files raise if run): 2 ranks under
    ZeRO-3 give the single process's losses, and the OpenAI-compatible server answers as greedy generation
    with the `chatglm` template does."""
    from test_chatglm_layouts import CODE_FILES, TRAP
    from test_serve import NAME, Server

    from conftest import train_one_and_two_ranks
    from dist_glm.data.template import build_template
    from dist_glm.models.artifacts import load_for_inference
    from dist_glm.models.loading import load_tokenizer

    base = tmp_path / "chatglm-6b"
    shutil.copytree(ASSET, base)
    published_directory(base, json.loads((ASSET / "config.json").read_text()))
    for name in CODE_FILES:
        (base / name).write_text(TRAP.format(name))
    settings = dict(
        model_name_or_path=base, train_from_scratch=False, finetuning_type="lora", learning_rate=1e-2, max_steps=4
    )
    one, two, a, b, stdout = train_one_and_two_ranks(tmp_path, varlen_data, "zero3", **settings)
    assert "loaded into dist_glm's own ChatGLM-6B" in stdout and "chat template: chatglm " in stdout
    assert sorted(b) == [1, 2, 3, 4] and max(abs(a[s] - b[s]) for s in a) < 2e-5, (a, b)

    tok = load_tokenizer(str(base))
    model = load_for_inference(str(base), str(two))
    conv = {"system": "", "tools": None, "messages": [{"role": "user", "content": "类型#裙*颜色#红色"}]}
    prompt = build_template("chatglm", tok).encode_prompt(conv)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=[tok.eos_token_id]
        )
    expected = tok.decode(out[0, len(prompt) :], skip_special_tokens=True)
    server = Server(two, tmp_path / "server.log")
    try:
        reply = server.client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "类型#裙*颜色#红色"}], max_tokens=8, temperature=0
        )
        # This tiny model writes stray bytes; the server holds back a byte that could start a character and
        # renders it differently from one decode() of the whole reply, so U+FFFD is left out of the comparison.
        assert reply.choices[0].message.content.replace("\ufffd", "").strip() == expected.replace("\ufffd", "").strip()
    finally:
        server.proc.terminate()
        server.proc.wait(timeout=30)


def test_export_in_thudms_layout_writes_the_published_directory_back(tmp_path):
    """export_layout=original on a published ChatGLM-6B directory: THUDM's names and values, its config.json
    (auto_map kept) and its own files, readable again as the same model."""
    from safetensors.torch import load_file

    from dist_glm.models.artifacts import ModelArgs
    from dist_glm.tools.export import ExportArgs, export

    base = tmp_path / "chatglm-6b"
    shutil.copytree(ASSET, base)
    published_directory(base, json.loads((ASSET / "config.json").read_text()))
    (base / "modeling_chatglm.py").write_text('raise RuntimeError("ran it")\n')
    out = tmp_path / "out"
    export(
        ModelArgs(model_name_or_path=str(base), dtype="float32"),
        ExportArgs(export_dir=str(out), export_layout="original"),
    )
    written = {}
    for shard in out.glob("*.safetensors"):
        written.update(load_file(shard))
    original = torch.load(base / "pytorch_model.bin")
    assert sorted(written) == sorted(k for k in original if not k.endswith("inv_freq"))
    assert all(torch.equal(written[k], original[k]) for k in written)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == json.loads((ASSET / "config.json").read_text())["auto_map"]
    assert (out / "ice_text.model").is_file() and (out / "modeling_chatglm.py").is_file()
