"""THUDM's published ChatGLM layouts (dist_glm/models/chatglm.py), loaded without their code and checked
against that code's own numbers: logits THUDM's modeling_chatglm.py computed once on tiny weights made by a
fixed recipe (tests/data/chatglm/, SOURCES.md), reproduced here by writing the same weights under the
published names and loading them through dist_glm. The tokenizers are checked against sentencepiece /
tiktoken themselves and against THUDM's tokenizer outputs; training, evaluation, chat, serving and export
run on checkpoint directories shaped like the published ones, whose Python files raise if anything runs them.
"""

import base64
import json
import random
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, base_args, child_env, run_script, run_train, train_one_and_two_ranks
from dist_glm.errors import UserError
from dist_glm.models import chatglm, chatglm_tokenizer
from dist_glm.models.loading import from_pretrained, load_config, load_tokenizer

DATA = REPO / "tests" / "data" / "chatglm"
ASSETS = {
    "chatglm2": REPO / "assets" / "tiny-chatglm2",
    "chatglm3": REPO / "assets" / "tiny-chatglm3",
    "chatglm3_32k": REPO / "assets" / "tiny-chatglm3",
    "glm4chat": REPO / "assets" / "tiny-glm-4-9b-chat",
}
# Stand-ins for the checkpoint's own Python: importing any of them fails the test. ChatGLM3's
# tokenization_chatglm.py names its role tokens, as THUDM's does (dist_glm reads that file as text, never runs
# it, to tell ChatGLM3 from ChatGLM2).
TRAP = 'raise RuntimeError("dist_glm ran {}")\n'
ROLE_TOKENS = 'ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]\n'
CODE_FILES = ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py")


def reference(layout: str) -> dict:
    return json.loads((DATA / f"{layout}.json").read_text(encoding="utf-8"))


def recipe_weights(shapes: dict) -> dict[str, torch.Tensor]:
    """The weights the references were computed with (SOURCES.md): per tensor name, a generator seeded with
    the name's CRC-32; norm weights 1 + 0.1 N(0,1), biases 0.1 N(0,1), everything else 0.05 N(0,1)."""
    out = {}
    for name in sorted(shapes):
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        t = torch.randn(shapes[name], generator=g, dtype=torch.float32)
        if t.dim() == 1 and name.endswith("weight"):
            t = 1 + 0.1 * t
        elif name.endswith("bias"):
            t = 0.1 * t
        else:
            t = 0.05 * t
        out[name] = t
    return out


def published_checkpoint(tmp_path, layout: str, config: dict | None = None, shards: int = 1):
    """A directory as THUDM published the layout: config.json, tokenizer files, the three Python files (traps
    here), and the recipe's weights under the published names, as pytorch_model*.bin (ChatGLM2/3) or
    model.safetensors (glm-4-9b-chat), sharded with an index when `shards` > 1."""
    ref = reference(layout)
    out = tmp_path / layout
    shutil.copytree(ASSETS[layout], out)
    config = config or dict(ref["tiny_config"])
    if layout == "glm4chat":  # the reference kept the real ids (151329...); this vocabulary has them lower
        asset = json.loads((ASSETS[layout] / "config.json").read_text())
        config.update(eos_token_id=asset["eos_token_id"], pad_token_id=asset["pad_token_id"])
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in CODE_FILES:
        roles = ROLE_TOKENS if layout.startswith("chatglm3") and name.startswith("tokenization") else ""
        (out / name).write_text(roles + TRAP.format(name))
    weights = recipe_weights(ref["state_dict_shapes"])
    # THUDM saved the rotary inverse frequencies with the weights; they are recomputed, so any value does.
    weights.update({name: torch.zeros(4) for name in ref["derived"]})
    names = sorted(weights)
    if layout == "glm4chat":
        from safetensors.torch import save_file

        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    if shards == 1:
        torch.save(weights, out / "pytorch_model.bin")
        return out
    index = {}
    for k in range(shards):
        file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = names[k::shards]
        torch.save({n: weights[n] for n in part}, out / file)
        index.update(dict.fromkeys(part, file))
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return out


def unpack(logits: dict) -> tuple[np.ndarray, np.ndarray]:
    head = np.frombuffer(base64.b64decode(logits["first_256_columns_f32_b64"]), dtype="<f4")
    return head.reshape(logits["shape"]), np.asarray(logits["logsumexp_all_columns"])


@pytest.mark.parametrize("layout", ["chatglm2", "chatglm3", "chatglm3_32k", "glm4chat"])
def test_logits_equal_thudm_code(tmp_path, layout):
    """fp32, every position of every case: the first 256 logits to 1e-5 and the log-sum-exp over the whole
    padded vocabulary to 1e-4 (it was kept to 6 decimals)."""
    ref = reference(layout)
    path = published_checkpoint(tmp_path, layout, shards=2 if layout == "chatglm3" else 1)
    assert chatglm.detect(path).name == layout.removesuffix("_32k")
    model = from_pretrained(str(path), dtype=torch.float32).eval()
    assert type(model).__name__ == "GlmForCausalLM"
    for case in ref["cases"]:
        ids = torch.tensor(case["input_ids"])
        kwargs = {"attention_mask": torch.tensor(case["attention_mask"])}
        if case["position_ids"] is not None:
            kwargs["position_ids"] = torch.tensor(case["position_ids"])
        with torch.no_grad():
            logits = model(ids, **kwargs).logits.double()
        if case.get("logits_of") == "non-pad positions":
            logits = logits[:, kwargs["attention_mask"][0].tolist().index(1) :]
        head, lse = unpack(case["logits"])
        assert np.abs(logits[..., :256].numpy() - head).max() < 1e-5, (layout, case["name"])
        assert np.abs(torch.logsumexp(logits, -1).numpy() - lse).max() < 1e-4, (layout, case["name"])


def test_ptuning_prefix_is_thudms_p_tuning_v2_in_training_and_generation(tmp_path):
    """THUDM's ChatGLM3 code with a P-tuning v2 prefix (pre_seq_len 4, no projection) computed these logits and
    this greedy continuation. dist_glm's ptuning with the same prefix vectors: the same logits (the text's
    positions start at 0 after the prefix, as there), and generate() continues the same way, the prefix
    attended to from the first step, with and without left padding."""
    from types import SimpleNamespace

    from dist_glm.methods import ptuning

    ref = reference("chatglm3")["ptuning"]
    model = from_pretrained(str(published_checkpoint(tmp_path, "chatglm3")), dtype=torch.float32)
    cfg = SimpleNamespace(method=SimpleNamespace(pre_seq_len=4, prefix_projection=False, prefix_hidden_size=64))
    peft_model = ptuning.make_trainable(model, cfg)
    ptuning.after_load(peft_model)  # as a training checkpoint is loaded: built, then adjusted; one hook counts
    prefix = recipe_weights({ref["prefix_weight"]: ref["prefix_shape"]})[ref["prefix_weight"]]
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(prefix)
    peft_model.eval()
    ids = torch.tensor(ref["input_ids"])
    with torch.no_grad():
        logits = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.double()
    head, lse = unpack(ref["logits"])
    assert np.abs(logits[..., :256].numpy() - head).max() < 1e-5
    assert np.abs(torch.logsumexp(logits, -1).numpy() - lse).max() < 1e-4
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids[:1]], 1)
    for prompt in (ids[:1], padded):
        mask = (torch.arange(prompt.shape[1]) >= prompt.shape[1] - 12).long()[None]
        with torch.no_grad():
            out = peft_model.generate(
                input_ids=prompt, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=[10**6],
                pad_token_id=0,
            )  # fmt: skip
        assert out[0, prompt.shape[1] :].tolist() == ref["greedy_continuation_of_row_0"]


def test_qlora_base_quantizes_the_published_weights_as_it_would_the_native_ones(tmp_path):
    """bitsandbytes quantizes what the renaming and the query/key/value split produce: 4-bit from the published
    layout equals 4-bit from the same weights saved natively."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = published_checkpoint(tmp_path, "chatglm3")
    four_bit = dict(
        dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
        device_map={"": "cpu"},
    )
    published = from_pretrained(str(path), **four_bit)
    assert type(published.model.layers[0].self_attn.k_proj).__name__ == "Linear4bit"
    from_pretrained(str(path), dtype=torch.float32).save_pretrained(tmp_path / "native")
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "native", **four_bit)
    ids = torch.tensor(reference("chatglm3")["cases"][0]["input_ids"])
    with torch.no_grad():
        assert torch.equal(published(ids).logits, native(ids).logits)


def test_weights_go_back_to_the_published_names_bit_for_bit(tmp_path):
    """What export_layout=original writes: loaded and mapped back, every published tensor is the same bytes."""
    ref = reference("glm4chat")
    model = from_pretrained(str(published_checkpoint(tmp_path, "glm4chat")), dtype=torch.float32)
    back = chatglm.original_state_dict(model.state_dict())
    expected = recipe_weights(ref["state_dict_shapes"])
    assert sorted(back) == sorted(expected)
    assert all(torch.equal(back[name], expected[name]) for name in expected)


def test_original_layout_export_needs_a_published_base(pretrained_tiny, tmp_path):
    from dist_glm.models.artifacts import ModelArgs
    from dist_glm.tools.export import ExportArgs, export

    args = ExportArgs(export_dir=str(tmp_path / "out"), export_layout="original")
    with pytest.raises(UserError, match="export_layout=original: .* not trained from one of THUDM's published"):
        export(ModelArgs(model_name_or_path=str(pretrained_tiny)), args)
    assert not (tmp_path / "out").exists()


def test_rope_ratio_and_sizes_become_glm_config():
    c = load_config(ASSETS["glm4chat"])
    published = json.loads((ASSETS["glm4chat"] / "config.json").read_text())
    assert (c.model_type, c.num_key_value_heads, c.head_dim, c.vocab_size) == ("glm", 2, 16, 768)
    assert c.rope_parameters["rope_theta"] == 10000 * published["rope_ratio"] == 5_000_000
    assert c.rope_parameters["partial_rotary_factor"] == 0.5 and c.intermediate_size == published["ffn_hidden_size"]
    assert c.rms_norm_eps == published["layernorm_epsilon"] and c.eos_token_id == published["eos_token_id"]


@pytest.mark.parametrize(
    "change,field",
    [
        ({"quantization_bit": 4}, "quantization_bit"),
        ({"pre_seq_len": 128}, "pre_seq_len"),
        ({"rmsnorm": False}, "rmsnorm"),
    ],
)
def test_settings_it_does_not_reproduce_are_refused(tmp_path, change, field):
    out = tmp_path / "chatglm3-6b"
    shutil.copytree(ASSETS["chatglm3"], out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UserError, match=rf"config.json: {field}=.*not a published .* setting dist_glm reproduces"):
        load_config(out)


def test_first_chatglm_quantized_is_refused_with_the_reason(tmp_path):
    out = tmp_path / "chatglm-6b-int4"
    shutil.copytree(REPO / "assets" / "tiny-chatglm-6b", out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_bit": 4}))
    with pytest.raises(UserError, match=r"config.json: quantization_bit=4 is not a published ChatGLM-6B"):
        load_config(out)


# ---------------------------------------------------------------- tokenizers


def sample_texts() -> list[str]:
    rng = random.Random(0)
    alphabet = "ab Z你好世界连衣裙\n\t19 ,.!?😀'sThe▁<|>/"
    fixed = [
        "这款红色连衣裙", "\n", " ", "  x", "hello  world\n\nx", "a\tb", "0123456789", "It's 3.14!", "emoji 😀",
        "def f(x):\n    return x**2\n", "sophisticated sop eop", "<|user|> in text", "[gMASK] in text", "▁lead",
        "</s> <unk> <s>",
    ]  # fmt: skip
    return fixed + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(200)]


@pytest.mark.parametrize("layout", ["chatglm2", "chatglm3"])
def test_sentencepiece_tokenizer_encodes_as_sentencepiece_does(layout):
    """Ordinary text, special-token names included (THUDM's tokenizer never finds them in text:
    "sophisticated" keeps its `sop`)."""
    import sentencepiece as spm

    tok = load_tokenizer(str(ASSETS[layout]))
    sp = spm.SentencePieceProcessor(model_file=str(ASSETS[layout] / "tokenizer.model"))
    for text in sample_texts():
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == sp.decode(ids), text
    specials = chatglm_tokenizer.CHATGLM3_SPECIAL if layout == "chatglm3" else chatglm_tokenizer.CHATGLM2_SPECIAL
    assert tok.convert_tokens_to_ids(specials) == list(range(sp.get_piece_size(), sp.get_piece_size() + len(specials)))
    assert (tok.eos_token_id, tok.pad_token_id, tok.padding_side) == (sp.eos_id(), sp.unk_id(), "left")


def test_tiktoken_tokenizer_encodes_as_tiktoken_does():
    """glm-4-9b-chat: tiktoken over the published pattern; its 14 special tokens after the ranks, found in text
    (THUDM registered them as added tokens)."""
    import tiktoken

    ranks = {}
    for line in (ASSETS["glm4chat"] / "tokenizer.model").read_text().splitlines():
        piece, rank = line.split()
        ranks[base64.b64decode(piece)] = int(rank)
    enc = tiktoken.Encoding(
        name="glm4", pat_str=chatglm_tokenizer.GLM4_PATTERN, mergeable_ranks=ranks, special_tokens={}
    )
    tok = load_tokenizer(str(ASSETS["glm4chat"]))
    for text in sample_texts():
        if "<|" in text or "[gMASK]" in text or "</s>" in text:
            continue
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == enc.encode(text) and tok.decode(ids) == text, text
    first = len(ranks)
    assert tok.convert_tokens_to_ids(chatglm_tokenizer.GLM4_SPECIAL) == list(range(first, first + 14))
    assert tok.encode("<|user|>\nx", add_special_tokens=False)[0] == first + 7
    assert tok.chat_template  # from its tokenizer_config.json


def thudm_tokenization(layout: str) -> dict:
    ref = json.loads((DATA / f"tokenization_{layout}.json").read_text(encoding="utf-8"))
    import hashlib

    asset = ASSETS[layout] / "tokenizer.model"
    assert hashlib.sha256(asset.read_bytes()).hexdigest() == ref["tokenizer_file_sha256"], "the asset changed"
    return ref


@pytest.mark.parametrize("layout", ["chatglm2", "chatglm3", "glm4chat"])
def test_tokenizer_gives_thudm_tokenizers_ids(layout):
    """THUDM's own tokenizer class on the same tokenizer.model (tests/data/chatglm/tokenization_*.json):
    ids of 22 strings, special-token ids, the [gMASK] sop prefix, padding."""
    ref, tok = thudm_tokenization(layout), load_tokenizer(str(ASSETS[layout]))
    for s in ref["strings"]:
        assert tok.encode(s["text"], add_special_tokens=False) == s["encode_no_special"], s["text"]
        assert tok.decode(s["encode_no_special"]) == s["decode_no_special"], s["text"]
    named = {k: v for k, v in ref["special_ids"].items() if k not in ("<bos>", "<eos>", "<pad>")}
    assert tok.convert_tokens_to_ids(list(named)) == list(named.values())
    assert (tok.pad_token_id, tok.padding_side) == (ref["pad_token_id"], ref["padding_side"])
    assert tok.eos_token_id == ref["eos_token_id"] or layout == "glm4chat"  # THUDM's glm4 class names none


def test_chatglm3_prompts_equal_build_chat_input():
    from dist_glm.data.template import build_template

    ref, tok = thudm_tokenization("chatglm3"), load_tokenizer(str(ASSETS["chatglm3"]))
    template = build_template("chatglm3", tok)
    for name, case in ref["chat"].items():
        if not name.startswith("build_chat_input"):
            continue
        history = case.get("history", [])
        system = next((m for m in history if m["role"] == "system"), {})
        messages = []
        for m in history:
            if m["role"] == "assistant" and m.get("metadata"):  # a tool call: its arguments, as data holds them
                call = {"name": m["metadata"], "arguments": json.dumps({"city": "北京"}, ensure_ascii=False)}
                messages.append({"role": "assistant", "content": "", "tool_call": call})
            elif m["role"] != "system":
                messages.append({"role": m["role"], "content": m["content"]})
        messages.append({"role": case.get("role", "user"), "content": case["query"]})
        conv = {"system": system.get("content", ""), "tools": system.get("tools"), "messages": messages}
        assert template.encode_prompt(conv) == case["input_ids"][0], name


def test_chatglm2_prompts_equal_its_build_prompt():
    from dist_glm.data.template import build_template

    ref, tok = thudm_tokenization("chatglm2"), load_tokenizer(str(ASSETS["chatglm2"]))
    template = build_template("chatglm2", tok)
    for name in ("first_round", "third_round"):
        case = ref["chat"][name]
        messages = [{"role": r, "content": c} for q, a in case["history"] for r, c in (("user", q), ("assistant", a))]
        conv = {"system": "", "tools": None, "messages": messages + [{"role": "user", "content": case["query"]}]}
        ids = case["input_ids"][0] if isinstance(case["input_ids"][0], list) else case["input_ids"]
        assert template.encode_prompt(conv) == ids, name


def test_glm4_chat_prompts_equal_its_apply_chat_template():
    from dist_glm.data.template import build_template

    ref, tok = thudm_tokenization("glm4chat"), load_tokenizer(str(ASSETS["glm4chat"]))
    case = ref["chat"]["system_user_assistant|add_generation_prompt=True"]
    system, *messages = case["messages"]
    conv = {"system": system["content"], "tools": None, "messages": messages}
    ids = case["input_ids"][0] if isinstance(case["input_ids"][0], list) else case["input_ids"]
    assert build_template("glm4", tok).encode_prompt(conv) == ids


def test_layouts_pick_their_templates():
    from dist_glm.data.template import choose_template

    expected = {"chatglm2": "chatglm2", "chatglm3": "chatglm3", "glm4chat": "glm4"}
    for layout, template in expected.items():
        tok = load_tokenizer(str(ASSETS[layout]))
        assert choose_template("auto", tok, "chatglm") == template
        assert choose_template("auto", tok, "glm") == template  # as saved after training, native layout


def test_lora_target_in_thudm_names_is_answered_with_glm_names():
    from types import SimpleNamespace

    from dist_glm.methods import lora

    cfg = SimpleNamespace(
        model=SimpleNamespace(model_name_or_path=str(ASSETS["chatglm3"]), trust_remote_code=False),
        method=SimpleNamespace(lora_target="query_key_value,dense", lora_modules_to_save=""),
    )
    (problem,) = lora.check_config(cfg)
    assert "query_key_value -> q_proj,k_proj,v_proj" in problem and "dense -> o_proj" in problem
    cfg.method.lora_target = "q_proj,v_proj,gate_up_proj"
    assert lora.check_config(cfg) == []


# ---------------------------------------------------------------- training and the tools


def greedy(model, prompt_ids: list[int], eos: list[int], tokens: int) -> list[int]:
    out = model.generate(
        input_ids=torch.tensor([prompt_ids]), max_new_tokens=tokens, do_sample=False, eos_token_id=eos, pad_token_id=0
    )
    return out[0, len(prompt_ids) :].tolist()


@pytest.mark.slow
def test_published_chatglm3_trains_on_two_zero3_ranks_and_every_tool_loads_the_result(tmp_path, varlen_data):
    """LoRA from a ChatGLM3-6B directory as THUDM published it (its Python files raise if run): 2 ranks under
    ZeRO-3, where every rank loads only its partition through the renaming, give the single process's losses;
    then evaluate, export (merged, native layout), chat and serve load the adapter on that directory."""
    from test_serve import NAME, Server  # the OpenAI-compatible server as its own tests drive it
    from transformers import AutoModelForCausalLM

    from dist_glm.data.template import build_template
    from dist_glm.models.artifacts import load_for_inference

    base = published_checkpoint(
        tmp_path, "chatglm3", config=json.loads((ASSETS["chatglm3"] / "config.json").read_text())
    )
    settings = dict(
        model_name_or_path=base, train_from_scratch=False, finetuning_type="lora", learning_rate=1e-2, max_steps=4
    )
    one, two, a, b, stdout = train_one_and_two_ranks(tmp_path, varlen_data, "zero3", **settings)
    assert "chatglm3 layout (THUDM's published files): loaded as GlmForCausalLM" in stdout
    assert "chat template: chatglm3" in stdout
    assert sorted(b) == [1, 2, 3, 4] and max(abs(a[s] - b[s]) for s in a) < 2e-5, (a, b)

    adapter = ["--model_name_or_path=" + str(base), f"--adapter_name_or_path={two}"]
    proc = run_script(
        "evaluate.py",
        [*adapter, f"--eval_dataset={varlen_data}", "--max_eval_samples=4", f"--output_dir={tmp_path / 'eval'}"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "eval_results.json").read_text())["eval/samples"] == 4

    merged = tmp_path / "merged"
    proc = run_script("export.py", [*adapter, f"--export_dir={merged}", "--dtype=float32"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((merged / "config.json").read_text())["architectures"] == ["GlmForCausalLM"]
    assert chatglm.detect(merged) is None  # the native layout, loaded by anything that reads transformers models
    tok = load_tokenizer(str(merged))
    trained = load_for_inference(str(base), str(two))
    native = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    conv = {"system": "", "tools": None, "messages": [{"role": "user", "content": "类型#裙*颜色#红色"}]}
    prompt = build_template("chatglm3", tok).encode_prompt(conv)
    with torch.no_grad():
        torch.testing.assert_close(
            native(torch.tensor([prompt])).logits, trained(torch.tensor([prompt])).logits, atol=1e-5, rtol=1e-5
        )
    # The published layout again: THUDM's names and files, read back through the same translation.
    original = tmp_path / "original"
    proc = run_script(
        "export.py", [*adapter, f"--export_dir={original}", "--dtype=float32", "--export_layout=original"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert chatglm.detect(original).name == "chatglm3" and (original / "modeling_chatglm.py").is_file()
    assert (
        json.loads((original / "config.json").read_text())["auto_map"]
        == json.loads((base / "config.json").read_text())["auto_map"]
    )
    round_trip = from_pretrained(str(original), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            round_trip(torch.tensor([prompt])).logits, native(torch.tensor([prompt])).logits, atol=0, rtol=0
        )
    eos = [tok.eos_token_id, *tok.convert_tokens_to_ids(["<|user|>", "<|observation|>"])]
    expected = tok.decode(greedy(trained, prompt, eos, 8), skip_special_tokens=True)

    chat = subprocess.run(
        [sys.executable, "launch/chat.py", *adapter, "--max_new_tokens=8"],
        input="类型#裙*颜色#红色\n",
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert chat.returncode == 0 and "Traceback" not in chat.stderr, chat.stderr[-3000:]
    assert chat.stdout.split("Assistant: ", 1)[1].split("\n\nUser:")[0] == expected.strip("\n")

    server = Server(two, tmp_path / "server.log")
    try:
        reply = server.client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "类型#裙*颜色#红色"}], max_tokens=8, temperature=0
        )
        assert reply.choices[0].message.content == expected.strip("\n")
    finally:
        server.proc.terminate()
        server.proc.wait(timeout=30)


@pytest.mark.slow
def test_ptuning_on_published_glm4_chat_exports_thudms_p_tuning_checkpoint(tmp_path, varlen_data):
    """P-tuning v2 from a glm-4-9b-chat directory as published; export_layout=original writes THUDM's P-tuning
    checkpoint: pytorch_model.bin with transformer.prefix_encoder.embedding.weight (pre_seq_len x layers x 2 x
    groups x head size) and config.json with pre_seq_len. That tensor, used the way THUDM's PrefixEncoder
    (no projection) uses it, gives the trained model's logits; dist_glm's tools take the directory too."""
    from types import SimpleNamespace

    from dist_glm.methods import ptuning
    from dist_glm.models.artifacts import load_for_inference

    base = published_checkpoint(tmp_path, "glm4chat")
    config = json.loads((base / "config.json").read_text())
    out = tmp_path / "ptuning"
    settings = dict(
        model_name_or_path=base, train_from_scratch=False, finetuning_type="ptuning", pre_seq_len=4,
        prefix_projection=True, prefix_hidden_size=32, learning_rate=1e-2, max_steps=3,
    )  # fmt: skip
    proc = run_train(base_args(out, varlen_data, **settings), nprocs=None)
    assert "glm4chat layout (THUDM's published files)" in proc.stdout and "chat template: glm4" in proc.stdout

    exported = tmp_path / "thudm-ptuning"
    adapter = [f"--model_name_or_path={base}", f"--adapter_name_or_path={out}", "--dtype=float32"]
    proc = run_script("export.py", [*adapter, f"--export_dir={exported}", "--export_layout=original"])
    assert proc.returncode == 0 and "P-tuning v2 checkpoint" in proc.stdout, proc.stderr[-3000:]
    saved = torch.load(exported / "pytorch_model.bin")
    assert list(saved) == ["transformer.prefix_encoder.embedding.weight"]
    written = json.loads((exported / "config.json").read_text())
    layers, groups, head = config["num_layers"], config["multi_query_group_num"], config["kv_channels"]
    assert saved["transformer.prefix_encoder.embedding.weight"].shape == (4, layers * 2 * groups * head)
    assert (written["pre_seq_len"], written["prefix_projection"]) == (4, False)
    assert written["auto_map"] == config["auto_map"] and (exported / "modeling_chatglm.py").is_file()

    trained = load_for_inference(str(base), str(out))
    thudm = ptuning.make_trainable(
        from_pretrained(str(base), dtype=torch.float32),
        SimpleNamespace(method=SimpleNamespace(pre_seq_len=4, prefix_projection=False, prefix_hidden_size=32)),
    )
    with torch.no_grad():
        thudm.prompt_encoder["default"].embedding.weight.copy_(saved["transformer.prefix_encoder.embedding.weight"])
    thudm.eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64]])
    with torch.no_grad():
        expected = trained(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        torch.testing.assert_close(thudm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, expected)
        again = load_for_inference(str(base), str(exported))  # the export is also a dist_glm adapter
        torch.testing.assert_close(again(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, expected)


RECIPE_CELLS = [
    ("chatglm", "ptuning"), ("chatglm2", "ptuning"), ("chatglm3", "ptuning"), ("chatglm", "full"),
    ("chatglm", "freeze"), ("chatglm", "qlora"),
]  # fmt: skip


def recipe_run(tmp_path, varlen_data, eval_data, layout: str, method: str) -> tuple[subprocess.Popen, Path]:
    """Starts configs/chatglm_ptuning_advertisegen.yaml on `layout` with `method`; returns the process and its
    output directory."""
    cell = tmp_path / f"{layout}-{method}"
    cell.mkdir()
    if layout == "chatglm":
        from test_chatglm6b import ASSET, published_directory

        base = cell / "chatglm-6b"
        shutil.copytree(ASSET, base)
        published_directory(base, json.loads((ASSET / "config.json").read_text()))
    else:
        config = json.loads((ASSETS[layout] / "config.json").read_text())
        base = published_checkpoint(cell, layout, config={**reference(layout)["tiny_config"], **config})
    out = cell / "out"
    overrides = {
        "model_name_or_path": base, "dataset": varlen_data, "eval_dataset": eval_data, "output_dir": out,
        "finetuning_type": method, "pre_seq_len": 8, "gradient_accumulation_steps": 2, "max_steps": 2,
        "eval_steps": 2, "save_steps": 0, "generation_max_new_tokens": 8, "disable_tqdm": True,
    }  # fmt: skip
    if method != "ptuning":
        del overrides["pre_seq_len"]
        overrides["learning_rate"] = 1e-3
    if method == "freeze":
        overrides["freeze_trainable_layers"] = 1
    if method == "qlora":
        overrides["quantization_bit"] = 4
    args = [str(REPO / "configs" / "chatglm_ptuning_advertisegen.yaml")] + [f"--{k}={v}" for k, v in overrides.items()]
    proc = subprocess.Popen(
        [sys.executable, "launch/train.py", *args], cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    return proc, out


@pytest.mark.slow
def test_thudm_advertisegen_recipe_runs_on_each_published_layout(tmp_path, varlen_data, eval_data):
    """configs/chatglm_ptuning_advertisegen.yaml (THUDM's P-tuning v2 AdvertiseGen recipe) from a directory as
    THUDM published each model, and ChatGLM-6B (dist_glm's own class) with the other methods: each trains,
    evaluates with generation at the end, and writes its artifact. The cells are single processes, mostly
    start-up, so they run two at a time (the machine's two cores)."""
    for pair in (RECIPE_CELLS[i : i + 2] for i in range(0, len(RECIPE_CELLS), 2)):
        runs = [
            (layout, method, *recipe_run(tmp_path, varlen_data, eval_data, layout, method)) for layout, method in pair
        ]
        for layout, method, proc, out in runs:
            stdout, stderr = proc.communicate(timeout=600)
            assert proc.returncode == 0, f"{layout} {method}: {stderr[-3000:]}"
            assert f"{layout} layout" in stdout and f"method={method}" in stdout
            assert "eval at step 2:" in stdout and "rouge-1=" in stdout, f"{layout} {method}"
            artifact = "adapter_model.safetensors" if method in ("ptuning", "qlora") else "model.safetensors"
            assert (out / artifact).is_file(), f"{layout} {method}"
