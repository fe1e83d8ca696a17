"""Loader paths on local directories shaped like the real checkpoints, and the real-vocabulary model:
GLM-4's 151,552-row vocabulary with the special tokens at their real ids, never a constant in the code."""

import importlib.util
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig

from conftest import REPO, TINY_MODEL
from dist_glm.data.template import IGNORE_INDEX, build_template, chat_template_mismatch, choose_template
from dist_glm.errors import UserError
from dist_glm.models.loading import generation_eos_ids, load_model, load_tokenizer

REAL_VOCAB = REPO / "assets" / "glm4-real-vocab"


def _assets_builder():
    spec = importlib.util.spec_from_file_location("build_demo_assets", REPO / "launch" / "build_demo_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def real_vocab_dir(tmp_path_factory):
    """assets/glm4-real-vocab (committed config) plus its generated tokenizer."""
    out = tmp_path_factory.mktemp("glm4-real-vocab")
    for name in ("config.json", "generation_config.json"):
        shutil.copy(REAL_VOCAB / name, out / name)
    _assets_builder().build_real_vocab_tokenizer(out)
    return out


def _checkpoint_dir(tmp_path, name, architecture, model_type):
    """A local directory shaped like a native checkpoint: config.json + tokenizer.json (no weights needed
    for the tokenizer and template paths)."""
    out = tmp_path / name
    shutil.copytree(TINY_MODEL, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "architectures": [architecture], "model_type": model_type}))
    return out


@pytest.mark.parametrize(
    "name,architecture,model_type,template",
    [("glm-4-9b-chat-hf", "GlmForCausalLM", "glm", "glm4"), ("GLM-4-9B-0414", "Glm4ForCausalLM", "glm4", "glm4_0414")],
)
def test_native_layouts_load_and_pick_their_template(tmp_path, name, architecture, model_type, template):
    path = _checkpoint_dir(tmp_path, name, architecture, model_type)
    tok = load_tokenizer(str(path))
    assert AutoConfig.from_pretrained(path).model_type == model_type
    assert choose_template("auto", tok, model_type) == template
    assert chat_template_mismatch(build_template(template, tok), tok) is None


def test_unknown_remote_code_layout_needs_trust_remote_code(tmp_path):
    """A layout dist_glm does not translate (here a made-up one) keeps pointing at its own code: refused
    until trust_remote_code is set. (THUDM's ChatGLM2/3 and glm-4-9b-chat layouts load without it:
    tests/test_chatglm_layouts.py.)"""
    out = tmp_path / "someglm-6b"
    out.mkdir()
    auto_map = {"AutoConfig": "configuration_someglm.SomeConfig", "AutoModel": "modeling_someglm.SomeModel"}
    (out / "config.json").write_text(
        json.dumps({"model_type": "someglm", "architectures": ["SomeModel"], "auto_map": auto_map})
    )
    (out / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_someglm.SomeTokenizer", None]}})
    )
    with pytest.raises(
        UserError,
        match=r"someglm-6b'.*needs its own code.*trust_remote_code is off by default.*set trust_remote_code=true",
    ):
        load_tokenizer(str(out))
    cfg = SimpleNamespace(model_name_or_path=str(out), trust_remote_code=False, train_from_scratch=True)
    with pytest.raises(UserError, match="trust_remote_code=true"):
        load_model(cfg, {}, torch.float32, seed=0)


def test_real_vocab_model_renders_real_special_ids_and_trains(real_vocab_dir):
    tok = load_tokenizer(str(real_vocab_dir))
    specials = tok.convert_tokens_to_ids(
        ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
    )
    assert specials == [151329, 151331, 151333, 151335, 151336, 151337, 151338]
    conv = {
        "system": "你是助手",
        "tools": [{"name": "get_weather", "description": "查天气", "parameters": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": "北京天气"},
            {"role": "assistant", "content": "", "tool_call": {"name": "get_weather", "arguments": '{"city": "北京"}'}},
            {"role": "observation", "content": "晴"},
            {"role": "assistant", "content": "北京晴"},
        ],
    }
    enc = build_template("glm4", tok).encode(conv, cutoff_len=1024)
    assert [i for i in enc.input_ids if i >= 151329] == [
        151331,
        151333,
        151335,
        151335,
        151336,
        151337,
        151338,
        151337,
        151336,
    ]
    assert max(i for i in enc.input_ids if i < 151329) < 1000  # text ids stay in the BPE part, never fillers
    assert sorted(generation_eos_ids(str(real_vocab_dir), tok)) == [151329, 151336, 151338]
    cfg = SimpleNamespace(model_name_or_path=str(real_vocab_dir), trust_remote_code=False, train_from_scratch=True)
    model = load_model(cfg, {}, torch.bfloat16, seed=0)
    assert model.config.vocab_size == 151552 and model.lm_head.weight.shape[0] == 151552
    ids = torch.tensor([enc.input_ids])
    labels = torch.tensor([enc.labels])
    loss = model(input_ids=ids, labels=labels).loss
    assert torch.isfinite(loss) and (labels != IGNORE_INDEX).sum() > 0


def _remote_code_checkpoint(tmp_path, pretrained_tiny):
    """A checkpoint whose config.json points at its own Python (written here: GLM-4 under another
    model_type), with the tiny GLM's weights and tokenizer: a layout dist_glm does not know."""
    out = tmp_path / "someglm"
    shutil.copytree(pretrained_tiny, out)
    (out / "configuration_someglm.py").write_text(
        "from transformers import GlmConfig\n\n\nclass SomeGlmConfig(GlmConfig):\n    model_type = 'someglm'\n"
    )
    (out / "modeling_someglm.py").write_text(
        "from transformers import GlmForCausalLM\n\nfrom .configuration_someglm import SomeGlmConfig\n\n\n"
        "class SomeGlmForCausalLM(GlmForCausalLM):\n    config_class = SomeGlmConfig\n"
    )
    config = json.loads((out / "config.json").read_text())
    auto_map = {
        "AutoConfig": "configuration_someglm.SomeGlmConfig",
        "AutoModelForCausalLM": "modeling_someglm.SomeGlmForCausalLM",
    }
    config.update(model_type="someglm", architectures=["SomeGlmForCausalLM"], auto_map=auto_map)
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_trust_remote_code_is_honoured_by_every_tool(tmp_path, pretrained_tiny):
    """trust_remote_code=true runs a checkpoint's own code where the tools load (dtype resolution, the one
    loader of artifacts evaluate and serve use, chat, export), as it does in training; without it they refuse."""
    from dist_glm.models.artifacts import ModelArgs, load_artifact, resolve_artifact, resolve_dtype
    from dist_glm.tools.chat import ChatArgs, ChatSession
    from dist_glm.tools.export import ExportArgs, export

    path = _remote_code_checkpoint(tmp_path, pretrained_tiny)
    art = resolve_artifact(str(path))
    with pytest.raises(UserError, match="trust_remote_code=true"):
        resolve_dtype("auto", art, torch.device("cpu"), for_export=True)
    assert resolve_dtype("auto", art, torch.device("cpu"), for_export=True, trust_remote_code=True) == torch.float32
    assert type(load_artifact(art, torch.float32, "cpu", trust_remote_code=True)).__name__ == "SomeGlmForCausalLM"
    trusted = ModelArgs(model_name_or_path=str(path), trust_remote_code=True)
    assert type(ChatSession(trusted, ChatArgs(max_new_tokens=2)).model).__name__ == "SomeGlmForCausalLM"
    export(trusted, ExportArgs(export_dir=str(tmp_path / "export")))
    assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == "someglm"
