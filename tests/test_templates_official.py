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


# ---- GLM-4.5 onward: glm4_5 (GLM-4.5/4.6) and glm4_7 (GLM-4.7, GLM-4.7-Flash, GLM-5) --------------------------
MOE_TOKENIZER = Path(__file__).resolve().parent.parent / "assets" / "tiny-glm4-moe"


@pytest.fixture(scope="module")
def moe_tokenizer():
    return AutoTokenizer.from_pretrained(MOE_TOKENIZER)


@pytest.mark.parametrize("template,name", cases("glm4_5") + cases("glm4_7") + cases("glm5_1") + cases("glm5_2"))
def test_thinking_formats_equal_the_official_rendering(moe_tokenizer, template, name):
    """The row (OpenAI messages, as a user's data file holds it) through our converter and template gives the
    official template's text and ids exactly, plus the role token that ends the last turn; labels train each
    assistant turn the model saw as it is (its reasoning shown, or none) up to the role token after it."""
    from dist_glm.data.converters import from_openai

    ref = references(template)[name]
    enc = build_template(template, moe_tokenizer).encode(from_openai(ref["row"], None), cutoff_len=4096)
    assert moe_tokenizer.decode(enc.input_ids[:-1]) == ref["text"]
    assert enc.input_ids == ref["input_ids"]
    assert enc.labels == ref["labels"]


def test_glmz1_samples_are_the_official_prompt_and_the_reply(moe_tokenizer):
    """GLM-Z1-0414: every sample a row trains as (one per assistant turn: the official template shows no
    earlier thought) is the official template's generation prompt for the turns before it, byte for byte,
    then the reply after its `<think>`, trained from just after `<|assistant|>` through the `<|user|>` that
    ends it. The prompt alone is what generation starts from."""
    from dist_glm.data.converters import from_openai

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)  # GLM-4-0414's tokens (Z1 is a Glm4ForCausalLM)
    template = build_template("glmz1", tok)
    refs = references("glmz1")
    assert {"plain", "multi_turn", "system", "empty_system", "whitespace", "reasoning_last", "reasoning_history",
            "think_in_content", "think_in_history_content"} <= set(refs)  # fmt: skip
    for name, ref in refs.items():
        conv = from_openai(ref["row"], None)
        samples = [template.encode(c, cutoff_len=4096) for c in template.expand(conv)]
        assert len(samples) == len(ref["samples"]), name
        for got, want in zip(samples, ref["samples"], strict=True):
            assert tok.decode(got.input_ids[:-1]) == want["text"], name
            assert (got.input_ids, got.labels) == (want["input_ids"], want["labels"]), name
            prompt = tok(want["prompt_text"], add_special_tokens=False)["input_ids"]
            assert got.prompt_ids == prompt, name
    whitespace = refs["whitespace"]["samples"][0]["text"]
    assert "<|system|>\n 系统 \n<|user|>\n类型#裙<|assistant|>\n<think>\n想一想\n</think>\n\n红色" == whitespace[12:]


def test_glmz1_refuses_tools_and_thinking_off_and_is_chosen_by_its_prompt(tmp_path):
    from dist_glm.data.template import choose_template
    from dist_glm.errors import UserError

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    template = build_template("glmz1", tok)
    plain = references("glmz1")["plain"]["row"]["messages"]
    for conv, match in (
        ({"messages": plain, "tools": PROBE_TOOLS_Z1, "where": "rows.jsonl:3"}, "rows.jsonl:3: template glmz1: GLM-Z1"),
        ({"messages": plain, "enable_thinking": False}, "template glmz1 always thinks"),
    ):
        with pytest.raises(UserError, match=match):
            template.encode(conv, 4096)
    assert choose_template("auto", tok, "glm4") == "glm4_0414"  # no chat_template: GLM-4-0414's format
    # A chat_template of our own that prompts as GLM-Z1's does (`<|assistant|>\n<think>`): auto picks glmz1.
    tok.chat_template = (
        "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n<think>{% endif %}"
    )
    assert choose_template("auto", tok, "glm4") == "glmz1"


PROBE_TOOLS_Z1 = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def test_the_thinking_renderings_cover_the_cases_that_matter():
    wanted = {
        "plain", "multi_turn", "system", "empty_system", "whitespace", "reasoning_last", "reasoning_history",
        "think_in_content", "thinking_off", "tools_with_system", "tools_without_system", "tool_call_last",
        "content_parts",
    }  # fmt: skip
    assert wanted <= set(references("glm4_5"))
    assert wanted | {"clear_thinking_false"} <= set(references("glm4_7"))
    several = references("glm4_5")["tools_with_system"]["text"]
    assert several.count("<tool_call>get_") == 3 and "<arg_value>[8, 12]</arg_value>" in several
    assert "<arg_value>true</arg_value>" in several and '{"unit": "c", "lang": null}' in several
    assert wanted | {"clear_thinking_false"} <= set(references("glm5_1")) & set(references("glm5_2"))
    assert {"plain_effort_high", "tools_with_system_effort_high"} <= set(references("glm5_2"))
    hidden = references("glm4_7")["reasoning_history"]
    assert "add again" in hidden["text"] and "<think>add</think>" not in hidden["text"]
    assert "<think>add</think>" in references("glm4_7")["clear_thinking_false"]["text"]


@pytest.mark.parametrize("template", ["glm4_5", "glm4_7"])
def test_earlier_reasoning_is_trained_once_in_a_sample_of_its_own(moe_tokenizer, template):
    """reasoning_history=expand (the default): a round whose reasoning the format hides in the full
    conversation gets a sample of its own, cut after it, where that reasoning is shown and trained; the
    full conversation then trains the rest. Every assistant turn is trained exactly once."""
    from dist_glm.data.converters import from_openai

    conv = from_openai(references(template)["reasoning_history"]["row"], None)
    t = build_template(template, moe_tokenizer)
    samples = t.expand(conv)
    assert len(samples) == 2 and samples[0]["messages"] == conv["messages"][:2]
    trained = []
    for s in samples:
        enc = t.encode(s, 4096)
        trained.append(
            moe_tokenizer.decode([i for i, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != -100])
        )
    nl = "\n" if template == "glm4_5" else ""
    assert trained == [f"{nl}<think>add</think>{nl}2<|user|>", f"{nl}<think>add again</think>{nl}4<|user|>"]
    assert build_template(template, moe_tokenizer, reasoning_history="drop").expand(conv) == [conv]
    if template == "glm4_7":  # keep: every turn's reasoning rendered (clear_thinking false), all trained
        kept = build_template(template, moe_tokenizer, reasoning_history="keep").expand(conv)
        assert kept[0]["clear_thinking"] is False
    else:
        from dist_glm.errors import UserError

        with pytest.raises(UserError, match="only GLM-4.7's format has"):
            build_template(template, moe_tokenizer, reasoning_history="keep")


def test_prepare_dumps_every_sample_for_review_and_never_overwrites(tmp_path, capsys):
    """prepare.py --dump_samples=FILE: one object per training sample, in dataset order, with the exact text
    the ids encode (special tokens included) and the labels; an existing FILE is refused, not overwritten."""
    from dist_glm.cli import prepare_main

    rows = [references("glm4_5")[name]["row"] for name in ("reasoning_history", "tools_with_system")]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    dump = tmp_path / "dump.jsonl"
    argv = [f"--model_name_or_path={MOE_TOKENIZER}", f"--dataset={data}", f"--dump_samples={dump}"]
    prepare_main(argv + [f"--data_cache_dir={tmp_path / 'cache'}"])
    dumped = [json.loads(line) for line in dump.read_text(encoding="utf-8").splitlines()]
    assert len(dumped) == 3  # the first row's earlier thought got a sample of its own
    assert dumped[1]["text"] == references("glm4_5")["reasoning_history"]["text"] + "<|user|>"  # the ending token
    assert dumped[2]["input_ids"] == references("glm4_5")["tools_with_system"]["input_ids"]
    assert dumped[2]["labels"] == references("glm4_5")["tools_with_system"]["labels"]
    before = dump.read_bytes()
    with pytest.raises(SystemExit):
        prepare_main(argv)
    assert "already exists" in capsys.readouterr().err and dump.read_bytes() == before


@pytest.mark.parametrize("content", ["<think>half a thought", "answer</think>", "<think>a</think><think>b</think>x"])
def test_broken_reasoning_markup_is_a_bad_row(content):
    from dist_glm.data.converters import from_openai
    from dist_glm.data.sources import BadRow

    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": content}]}
    with pytest.raises(BadRow, match=r"messages\[1\]: the reply's reasoning markup is broken"):
        from_openai(row, None)


def test_thinking_switch_per_dataset_and_per_run(tmp_path, capsys):
    """Mixed thinking / non-thinking data: a dataset_info.json entry's `enable_thinking: false` renders its rows
    (those without a switch of their own) in the model's thinking-off form, the official rendering exactly; the
    run's `enable_thinking` does the same for every dataset; a template without a thinking mode refuses it."""
    from dist_glm.cli import prepare_main

    ref = references("glm4_5")["thinking_off"]
    row = {k: v for k, v in ref["row"].items() if k != "enable_thinking"}
    (tmp_path / "nothink.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    (tmp_path / "think.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    openai = {"formatting": "sharegpt", "columns": {"messages": "messages"}}
    openai["tags"] = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    registry = {"off": {"file_name": "nothink.jsonl", "enable_thinking": False, **openai}}
    registry["on"] = {"file_name": "think.jsonl", **openai}
    (tmp_path / "dataset_info.json").write_text(json.dumps(registry), encoding="utf-8")

    def dump(*flags: str, name: str) -> list[str]:
        out = tmp_path / f"{name}.jsonl"
        prepare_main(
            [f"--model_name_or_path={MOE_TOKENIZER}", f"--dataset_dir={tmp_path}", f"--dump_samples={out}",
             f"--data_cache_dir={tmp_path / 'cache'}", *flags]
        )  # fmt: skip
        return [json.loads(line)["text"] for line in out.read_text(encoding="utf-8").splitlines()]

    off, on = dump("--dataset=off,on", name="per_dataset")
    assert off == ref["text"] + "<|user|>"
    assert on != off and "/nothink<|assistant|>" not in on.split("再见")[0] and "<think></think>" in on
    assert dump("--dataset=on", "--enable_thinking=false", name="per_run") == [off]
    with pytest.raises(SystemExit):
        dump("--dataset=off", "--template=glm4", name="refused")
    assert "template glm4 has no thinking mode" in capsys.readouterr().err


def test_reasoning_under_a_template_without_thinking_is_refused_not_dropped(tmp_path, capsys):
    from dist_glm.cli import prepare_main

    row = {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "t"}]
    }
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit):
        prepare_main([f"--model_name_or_path={TINY_MODEL}", f"--dataset={data}", f"--data_cache_dir={tmp_path}"])
    assert f"{data}:1: an assistant turn carries reasoning_content" in capsys.readouterr().err


def test_glm5_formats_differ_from_glm4_7_where_the_official_ones_do(moe_tokenizer):
    """GLM-5.1 lists a tool as its function; GLM-5.2 adds the reasoning effort (thinking on only) and writes an
    empty thought whole. The probes `template: auto` matches a checkpoint's chat_template with tell all four
    thinking formats apart."""
    from dist_glm.data.template import PROBE_TOOLS, PROBES, TOOL_PROBE

    tools_47 = references("glm4_7")["tools_without_system"]["text"]
    tools_51 = references("glm5_1")["tools_without_system"]["text"]
    assert '{"type": "function", "function": {"name": ' in tools_47 and '\n{"name": ' in tools_51
    tool_turn = tools_51.split("<|user|>")[0].removeprefix("[gMASK]<sop>")
    assert references("glm5_2")["tools_without_system"]["text"].startswith(
        "[gMASK]<sop><|system|>Reasoning Effort: Max" + tool_turn + "<|user|>"
    )
    assert references("glm5_2")["plain"]["text"].startswith("[gMASK]<sop><|system|>Reasoning Effort: Max<|user|>")
    assert "Reasoning Effort: High<|system|>" in references("glm5_2")["tools_with_system_effort_high"]["text"]
    assert "Reasoning Effort" not in references("glm5_2")["thinking_off"]["text"]
    assert "<|assistant|><think></think>" in references("glm5_2")["thinking_off"]["text"]
    renderings = {}
    for name in ("glm4_5", "glm4_7", "glm5_1", "glm5_2"):
        t = build_template(name, moe_tokenizer)
        convs = [{"system": "", "messages": p, "tools": None} for p in PROBES]
        convs.append({"system": "", "messages": TOOL_PROBE, "tools": PROBE_TOOLS})
        renderings[name] = tuple(tuple(t.encode_prompt(c)) for c in convs)
    assert len(set(renderings.values())) == 4


def test_reasoning_effort_is_max_or_high():
    from dist_glm.data.converters import from_openai
    from dist_glm.data.sources import BadRow

    row = {
        "reasoning_effort": "low",
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    }
    with pytest.raises(BadRow, match="reasoning_effort is 'low'; GLM-5.2 knows max and high"):
        from_openai(row, None)


def test_one_file_under_two_entries_with_different_switches_is_refused(tmp_path, capsys):
    """A dataset's thinking switch travels with its file: one file registered twice, thinking on and off, would
    render one way only, so it is refused with the fix."""
    from dist_glm.cli import prepare_main

    (tmp_path / "rows.jsonl").write_text(json.dumps(references("glm4_5")["plain"]["row"]) + "\n", encoding="utf-8")
    openai = {"formatting": "sharegpt", "columns": {"messages": "messages"}}
    openai["tags"] = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    registry = {"on": {"file_name": "rows.jsonl", **openai}, "off": {"file_name": "rows.jsonl", **openai}}
    registry["off"]["enable_thinking"] = False
    (tmp_path / "dataset_info.json").write_text(json.dumps(registry), encoding="utf-8")
    with pytest.raises(SystemExit):
        prepare_main([f"--model_name_or_path={MOE_TOKENIZER}", f"--dataset_dir={tmp_path}", "--dataset=on,off"])
    err = capsys.readouterr().err
    assert "two dataset_info.json entries read" in err and "give each its own file" in err
