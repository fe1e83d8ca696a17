"""Golden tests against the official GLM references, kept as facts: each fixed conversation's rendering
by the official chat template or builder (text, ids on the tiny tokenizer, labels by THUDM's fine-tuning
rule) is stored in tests/data/official_renderings/<template>.jsonl, and ours must be equal to it.
tests/data/official_renderings/SOURCES.md says where each reference came from and how the renderings were
made; no template file or builder of another project is kept here."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import TINY_MODEL
from dist_glm.data.template import build_template, python_tool_call

RENDERINGS = Path(__file__).parent / "data" / "official_renderings"


def references(template: str) -> dict[str, dict]:
    lines = (RENDERINGS / f"{template}.jsonl").read_text(encoding="utf-8").splitlines()
    return {row["name"]: row for row in map(json.loads, lines)}


def cases(template: str) -> list[tuple[str, str]]:
    return [(template, name) for name in references(template)]


@pytest.fixture(scope="module")
def tokenizers():
    plain = AutoTokenizer.from_pretrained(TINY_MODEL)
    chatglm = AutoTokenizer.from_pretrained(TINY_MODEL)  # plus ChatGLM's `sop`, as the renderings were made
    chatglm.add_special_tokens({"additional_special_tokens": ["sop"]}, replace_extra_special_tokens=False)
    return {"glm4": plain, "glm4_0414": plain, "chatglm3": chatglm, "chatglm2": chatglm, "chatglm": chatglm}


@pytest.mark.parametrize(
    "template,name",
    cases("glm4") + cases("glm4_0414") + cases("chatglm3") + cases("chatglm2") + cases("chatglm"),
)
def test_ours_equals_the_official_rendering(tokenizers, template, name):
    ref = references(template)[name]
    tok = tokenizers[template]
    enc = build_template(template, tok).encode(ref["conversation"], cutoff_len=4096)
    assert tok.decode(enc.input_ids) == ref["text"]
    assert enc.input_ids == ref["input_ids"]
    assert enc.labels == ref["labels"]
    if template == "chatglm":  # the prompt a generation starts from ends where the trained answer begins
        trained = sum(label != -100 for label in ref["labels"])
        assert enc.prompt_ids == ref["input_ids"][: len(ref["input_ids"]) - trained]


@pytest.mark.parametrize("name", list(references("glm4")))
def test_glm4_tool_turns_differ_from_transformers_rendering_only_in_the_blank_line(tokenizers, name):
    # THUDM's own builders render glm-4-9b-chat's template without trim_blocks ("\n\n## name" before each
    # tool); transformers' apply_chat_template trims it to "\n## name". We train what THUDM's finetune.py fed.
    ref = references("glm4")[name]
    ours = tokenizers["glm4"].decode(
        build_template("glm4", tokenizers["glm4"]).encode(ref["conversation"], 4096).input_ids
    )
    expected = ours.replace("\n\n## ", "\n## ") if ref["conversation"]["tools"] else ours
    assert ref["text_through_transformers"] == expected


def test_the_renderings_cover_the_formats_and_cases_that_matter():
    # A rendering file silently losing its tool or multi-turn cases would leave the golden test green.
    for template in ("glm4", "glm4_0414", "chatglm3"):
        names = set(references(template))
        assert {"plain", "multi_turn", "system", "tools_with_system", "tool_call_observation_reply"} <= names
    for template in ("chatglm2", "chatglm"):
        assert {"plain", "multi_turn", "system"} <= set(references(template))
    assert references("glm4_0414")["tools_with_system"]["text"].startswith("[gMASK]<sop><|system|>\n")
    assert "# 可用工具\n\n## get_weather\n\n{" in references("glm4_0414")["tools_without_system"]["text"]


def test_chatglm3_tool_call_is_a_python_block():
    # THUDM/ChatGLM3 PROMPT.md: a tool call is `<|assistant|>{name}\n```python\ntool_call(k=v)\n```.
    assert python_tool_call('{"location": "beijing", "unit": "celsius"}') == (
        "```python\ntool_call(location='beijing', unit='celsius')\n```"
    )
    assert python_tool_call("not json") == "```python\nnot json\n```"
