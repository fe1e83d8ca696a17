"""Replies of the GLM-4.5-onward formats parsed into reasoning_content / content / tool_calls, streamed
piece by piece: for every assistant turn of the official renderings, render(parse(reply)) == reply."""

import json
import random
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dist_glm.data.converters import from_openai
from dist_glm.data.template import build_template
from dist_glm.tools.serving.thinking_replies import ThinkingReply
from dist_glm.tools.serving.tool_calls import ToolPlan

RENDERINGS = Path(__file__).parent / "data" / "official_renderings"
TOKENIZER = Path(__file__).resolve().parent.parent / "assets" / "tiny-glm4-moe"


def assistant_turns(template: str):
    """(row, reply text as the model writes it after the prompt, whether the prompt left thinking on)."""
    for line in (RENDERINGS / f"{template}.jsonl").read_text(encoding="utf-8").splitlines():
        ref = json.loads(line)
        for turn in ref["text"].split("<|assistant|>")[1:]:
            for role in ("<|user|>", "<|observation|>", "<|system|>"):
                turn = turn.split(role)[0]
            if template != "glm4_5":  # the prompt opened the thought (or closed it: thinking off)
                thinking = turn.startswith("<think>")
                reply = turn.removeprefix("<think>") if thinking else turn.removeprefix("</think>")
            else:
                thinking, reply = True, turn
            yield ref["name"], ref["row"], turn, reply, thinking


def z1_turns():
    """GLM-Z1: each reference sample's reply is what follows its official prompt (which ends `\n<think>`)."""
    for line in (RENDERINGS / "glmz1.jsonl").read_text(encoding="utf-8").splitlines():
        ref = json.loads(line)
        for sample in ref["samples"]:
            reply = sample["text"][len(sample["prompt_text"]) :]
            yield ref["name"], ref["row"], "\n<think>" + reply, reply, True


def cases():
    thinking = [(t, *case) for t in ("glm4_5", "glm4_7", "glm5_1", "glm5_2") for case in assistant_turns(t)]
    return thinking + [("glmz1", *case) for case in z1_turns()]


@pytest.mark.parametrize("template,name,row,turn,reply,thinking", cases())
def test_render_of_the_parsed_reply_is_the_reply(template, name, row, turn, reply, thinking):
    rng = random.Random(name)
    parser = ThinkingReply(ToolPlan(frozenset()), template, thinking, row.get("tools"))
    deltas, i = [], 0
    while i < len(reply):  # pieces of 1 to 6 characters, as a stream delivers them
        n = rng.randint(1, 6)
        deltas += parser.feed(reply[i : i + n])
        i += n
    deltas += parser.finish()
    message = parser.message()
    # The stream's deltas add up to the message.
    assert "".join(d.get("reasoning_content", "") for d in deltas).strip() == message.get("reasoning_content", "")
    assert "".join(d.get("content", "") for d in deltas).strip() == (message["content"] or "")
    assert [c for d in deltas for c in d.get("tool_calls", [])] == [
        dict(c, index=i) for i, c in enumerate(message.get("tool_calls", []))
    ]
    # Rendered again by the training template (through the same converter as a data row): the same text.
    conv = from_openai({"messages": [{"role": "user", "content": "q"}, message], "tools": row.get("tools")}, None)
    template_obj = build_template(template, AutoTokenizer.from_pretrained(TOKENIZER))
    text, _ = template_obj._assistant_text(conv["messages"][1:], shows_reasoning=True)
    assert "".join(text) == turn  # GLM-Z1's is (the prompt's tail, the reply)
    for call in message.get("tool_calls", []):
        assert isinstance(json.loads(call["function"]["arguments"]), dict)


def test_arguments_keep_their_types_and_schema_strings_stay_strings():
    tools = [
        {"type": "function", "function": {"name": "f", "parameters": {"properties": {"code": {"type": "string"}}}}}
    ]
    parser = ThinkingReply(ToolPlan(frozenset({"f"})), "glm4_7", False, tools)
    parser.feed("好的<tool_call>f<arg_key>code</arg_key><arg_value>007</arg_value><arg_key>n</arg_key>")
    parser.feed("<arg_value>7</arg_value><arg_key>on</arg_key><arg_value>true</arg_value></tool_call>")
    parser.finish()
    message = parser.message()
    assert message["content"] == "好的"
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"code": "007", "n": 7, "on": True}
    assert parser.finish_reason("stop") == "tool_calls"


def test_required_among_several_tools_opens_the_call_and_holds_the_reply_to_a_name():
    """tool_choice "required" with two tools on GLM-4.5 onward: the prompt ends with the call's opening, the
    first tokens can only spell an offered name (whole: "get" alone is not one), then the reply is free."""
    import torch

    from dist_glm.tools.serving.tool_calls import NameConstraint, plan

    tools = [{"type": "function", "function": {"name": n}} for n in ("get_weather", "get_time")]
    for template in ("glm4_5", "glm4_7", "glm5_1", "glm5_2"):
        p = plan(tools, "required", template)
        assert (p.required, p.opened, p.forced) == (True, True, None)
    assert not plan(tools, "required", "glm4").opened  # GLM-4 calls open with the name: nothing to write
    names = NameConstraint([[5, 6, 7], [5, 9], []])
    allowed = []
    for token in (5, 9, 3):
        scores = torch.zeros(12)
        names.mask(scores)
        allowed.append(sorted(torch.isfinite(scores).nonzero().flatten().tolist()))
        names.accept(token)
    assert allowed == [[5], [6, 9], list(range(12))]
    parser = ThinkingReply(plan(tools, "required", "glm4_7"), "glm4_7", True, tools)
    parser.feed("get_time<arg_key>zone</arg_key><arg_value>UTC</arg_value></tool_call>")
    parser.finish()
    call = parser.message()["tool_calls"][0]["function"]
    assert (call["name"], json.loads(call["arguments"])) == ("get_time", {"zone": "UTC"})


@pytest.mark.slow
def test_served_with_the_openai_client_reasoning_first_tool_choice_and_thinking_switch(tmp_path):
    """A tiny GLM-4.7-Flash-shaped checkpoint (random weights: the text is noise, the structure is not) served
    and asked with the official openai client: history with reasoning_content and tool calls is accepted, a
    streamed reply equals the plain one and carries reasoning before content, a named tool_choice makes the
    reply that tool's call, and chat_template_kwargs enable_thinking=false gives a reply without reasoning."""
    import shutil

    import torch
    from test_serve import NAME, Server, serving
    from transformers import AutoConfig, AutoModelForCausalLM

    model = tmp_path / "tiny-glm4-moe-lite"
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(TOKENIZER.parent / "tiny-glm4-moe-lite")
    config.max_position_embeddings = 2048  # the tool list alone is ~500 tokens of the tiny vocabulary
    AutoModelForCausalLM.from_config(config).save_pretrained(model)
    for f in (TOKENIZER.parent / "tiny-glm4-moe-lite").iterdir():
        if f.name.startswith(("tokenizer", "generation")):
            shutil.copy(f, model / f.name)
    # A plain chat template of our own (serving needs one); the served format is glm4_7, by the model type.
    (model / "chat_template.jinja").write_text(
        "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    gen = serving(model, tmp_path / "server.log")
    server: Server = next(gen)
    try:
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
        history = [
            {"role": "user", "content": "北京天气"},
            {"role": "assistant", "content": None, "reasoning_content": "查一下",
             "tool_calls": [{"id": "call_1", "type": "function",
                             "function": {"name": "get_weather", "arguments": "{\"city\": \"北京\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "晴"},
            {"role": "user", "content": "上海呢"},
        ]  # fmt: skip
        ask = dict(model=NAME, messages=history, tools=tools, max_tokens=12, temperature=0)
        plain = server.client.chat.completions.create(**ask)
        assert plain.choices[0].finish_reason in ("stop", "length", "tool_calls")
        message = plain.choices[0].message.model_dump()
        stream = server.client.chat.completions.create(**ask, stream=True)
        kinds, reasoning, content = [], "", ""
        for chunk in stream:
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta.model_dump()
            for key in ("reasoning_content", "content"):
                if delta.get(key):
                    kinds.append(key)
            reasoning += delta.get("reasoning_content") or ""
            content += delta.get("content") or ""
        assert reasoning.strip() == (message.get("reasoning_content") or "")
        assert content.strip() == (message["content"] or "")
        assert kinds == sorted(kinds, key=["reasoning_content", "content"].index)  # reasoning first
        forced = server.client.chat.completions.create(
            **ask, tool_choice={"type": "function", "function": {"name": "get_weather"}}
        ).choices[0]
        called = forced.message.model_dump()
        if forced.finish_reason == "tool_calls":
            assert called["tool_calls"][0]["function"]["name"] == "get_weather"
        else:  # cut by max_tokens inside the call: returned as the text written so far
            assert called["content"].startswith("<tool_call>get_weather")
        two = [*tools, {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
        required = server.client.chat.completions.create(**{**ask, "tools": two}, tool_choice="required").choices[0]
        called = required.message.model_dump()
        if required.finish_reason == "tool_calls":  # random weights: the name is held to the tools', not the rest
            assert called["tool_calls"][0]["function"]["name"] in ("get_weather", "get_time")
        else:
            assert re.match("<tool_call>get_(weather|time)", called["content"]), called
        off = server.client.chat.completions.create(
            **ask, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
        )
        assert "reasoning_content" not in off.choices[0].message.model_dump(exclude_none=True)
        bad = server.post({**ask, "chat_template_kwargs": {"enable_thinking": "no"}})
        assert bad.status_code == 400 and "chat_template_kwargs.enable_thinking" in bad.text
        bad = server.post({**ask, "chat_template_kwargs": {"reasoning_effort": "low"}})
        assert bad.status_code == 400 and "reasoning_effort must be max or high" in bad.text
    finally:
        next(gen, None)
