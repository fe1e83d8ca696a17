"""Golden tests against the official GLM references (tests/data/official_templates/SOURCES.md says where
each comes from): a fixed set of conversations is rendered by the official template or builder and by
ours, and text, ids and labels must be equal."""

import json
from pathlib import Path

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers import AutoTokenizer

from conftest import TINY_MODEL
from dist_glm.data.template import IGNORE_INDEX, build_template, python_tool_call

X = IGNORE_INDEX
REFS = Path(__file__).parent / "data" / "official_templates"
WEATHER = {
    "name": "get_weather",
    "description": "查天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
CALC = {
    "name": "calc",
    "description": "算术",
    "parameters": {"type": "object", "properties": {"expr": {"type": "string"}}},
}


def conv(*turns, system="", tools=None):
    return {"system": system, "tools": tools, "messages": [dict(t) for t in turns]}


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


CALL = {"role": "assistant", "content": "", "tool_call": {"name": "get_weather", "arguments": '{"city": "北京"}'}}
CONVERSATIONS = {
    "plain": conv(u("类型#裙"), a("红色")),
    "multi_turn": conv(u("你好"), a("好的"), u("类型#裙\n颜色#红色"), a("红色裙子")),
    "system": conv(u("你好"), a("好的"), system="你是广告文案助手"),
    "empty_system": conv(u("你好"), a("好的"), system=""),
    "tools_without_system": conv(u("天气"), a("要查哪里？"), tools=[WEATHER, CALC]),
    "tools_with_system": conv(u("天气"), a("要查哪里？"), system="你是助手",
                              tools=[{"type": "function", "function": WEATHER}]),
    "tool_call_observation_reply": conv(u("北京天气"), CALL, {"role": "observation", "content": '{"weather": "晴"}'},
                                        a("北京晴"), tools=[WEATHER]),
    "whitespace": conv(u("  两个空格开头\n\n两个换行 "), a("\n回答以换行开头  "), system=" 空格 "),
    "chinese": conv(u("请用一句话介绍长城。"), a("长城是中国古代的军事防御工程，绵延万里。")),
}  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY_MODEL)


@pytest.fixture(scope="module")
def tok3():
    """The tiny tokenizer plus ChatGLM's `sop` and ChatGLM-6B's pieces."""
    t = AutoTokenizer.from_pretrained(TINY_MODEL)
    t.add_special_tokens({"additional_special_tokens": ["sop"]}, replace_extra_special_tokens=False)
    return t


def render(template: str, messages: list, trim_blocks: bool, **kw) -> str:
    """A chat template rendered the way transformers renders it (its sandbox, its `tojson` with
    ensure_ascii=False and no key sorting), with trim_blocks / lstrip_blocks on or off."""

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=trim_blocks, lstrip_blocks=trim_blocks, undefined=jinja2.Undefined)
    env.filters["tojson"] = tojson
    return env.from_string(template).render(messages=messages, **kw)


def finetune_labels(ids: list[int], tok, end_role="<|user|>") -> list[int]:
    """THUDM's label rule (GLM-4 finetune.py, ChatGLM3 finetune_hf.py): the tokens of an assistant
    message, role token included, are masked in; the mask is shifted one token right."""
    role_ids = {tok.convert_tokens_to_ids(f"<|{r}|>"): r for r in ("system", "user", "assistant", "observation")}
    mask, role = [], None
    for i in ids:
        role = role_ids.get(i, role)
        mask.append(role == "assistant")
    mask[-1] = False  # the appended end token
    return [X] + [t if m else X for t, m in zip(ids[1:], mask[:-1], strict=True)]


def glm4_messages(c: dict, metadata_key="metadata") -> list[dict]:
    """A conversation as glm-4-9b-chat's template takes it: tools on the system message (OpenAI style),
    a tool call as an assistant message whose metadata is the tool name."""
    messages = []
    if c["tools"] or c["system"]:
        system = {"role": "system", "content": c["system"]}
        if c["tools"]:
            system["tools"] = [t if "function" in t else {"type": "function", "function": t} for t in c["tools"]]
        messages.append(system)
    for m in c["messages"]:
        if m.get("tool_call"):
            messages.append(
                {"role": "assistant", metadata_key: m["tool_call"]["name"], "content": m["tool_call"]["arguments"]}
            )
        else:
            messages.append({"role": m["role"], "content": m["content"], "metadata": ""})
    return messages


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_glm4_equals_glm_4_9b_chat_template_and_thudm_finetune(tok, name):
    c = CONVERSATIONS[name]
    reference = (REFS / "glm-4-9b-chat.jinja").read_text(encoding="utf-8")
    messages = glm4_messages(c)
    # THUDM's own builders write "\n\n## name" (plain jinja); transformers' trim_blocks makes it "\n## name".
    text = render(reference, messages, trim_blocks=False) + "<|user|>"
    ids = tok.encode(text, add_special_tokens=False)
    # finetune.py renders message by message and concatenates; that must be the same ids.
    per_message = tok.encode("[gMASK]<sop>", add_special_tokens=False)
    for m in messages:
        per_message += tok.encode(render(reference, [m], trim_blocks=False), add_special_tokens=False)[2:]
    assert per_message + [tok.convert_tokens_to_ids("<|user|>")] == ids
    enc = build_template("glm4", tok).encode(c, cutoff_len=4096)
    assert tok.decode(enc.input_ids) == text
    assert enc.input_ids == ids
    assert enc.labels == finetune_labels(ids, tok)
    transformers_text = render(reference, messages, trim_blocks=True) + "<|user|>"
    assert transformers_text == (text.replace("\n\n## ", "\n## ") if c["tools"] else text)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_glm4_0414_equals_its_own_template(tok, name):
    c = CONVERSATIONS[name]
    reference = (REFS / "GLM-4-9B-0414.jinja").read_text(encoding="utf-8")
    messages = [m for m in glm4_messages(c) if m["role"] != "system" or m["content"]]
    for m in messages:
        m.pop("tools", None)
    # GLM-4-0414 is a native transformers model: its template through transformers is the reference.
    text = render(reference, messages, trim_blocks=True, tools=c["tools"]) + "<|user|>"
    ids = tok.encode(text, add_special_tokens=False)
    enc = build_template("glm4_0414", tok).encode(c, cutoff_len=4096)
    assert tok.decode(enc.input_ids) == text
    assert enc.input_ids == ids
    assert enc.labels == finetune_labels(ids, tok)
    if c["tools"]:
        assert text.startswith("[gMASK]<sop><|system|>\n# 可用工具\n\n## get_weather\n\n{")


# ---- ChatGLM3: its Python builder, restated from THUDM/ChatGLM3 model/tokenization_chatglm.py


def chatglm3_build_single_message(tok, role, metadata, message):
    # role_tokens = [self.get_command(f"<|{role}|>")] + self.tokenizer.encode(f"{metadata}\n")
    # message_tokens = self.tokenizer.encode(message)
    encode = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    return [tok.convert_tokens_to_ids(f"<|{role}|>")] + encode(f"{metadata}\n") + encode(message)


def chatglm3_reference(tok, c):
    history = []
    if c["tools"]:  # build_chat_input: content + "\n" + json.dumps(tools, indent=4, ensure_ascii=False)
        functions = [t.get("function", t) for t in c["tools"]]
        history.append(("system", "", c["system"] + "\n" + json.dumps(functions, indent=4, ensure_ascii=False)))
    elif c["system"]:
        history.append(("system", "", c["system"]))
    for m in c["messages"]:
        if m.get("tool_call"):  # PROMPT.md: <|assistant|>{name}\n```python\ntool_call(k=v)\n```
            args = json.loads(m["tool_call"]["arguments"])
            call = "tool_call(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")"
            history.append(("assistant", m["tool_call"]["name"], f"```python\n{call}\n```"))
        else:
            history.append((m["role"], "", m["content"]))
    ids = tok.convert_tokens_to_ids(["[gMASK]", "sop"])
    for role, metadata, message in history:
        ids += chatglm3_build_single_message(tok, role, metadata, message)
    return ids + [tok.eos_token_id]


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_chatglm3_equals_its_python_builder(tok3, name):
    c = CONVERSATIONS[name]
    ids = chatglm3_reference(tok3, c)
    enc = build_template("chatglm3", tok3).encode(c, cutoff_len=4096)
    assert enc.input_ids == ids
    assert enc.labels == finetune_labels(ids, tok3)
    if c["tools"] and not c["system"]:
        assert tok3.decode(enc.input_ids).startswith("[gMASK]sop<|system|>\n\n[")  # the kept leading newline


def test_chatglm3_tool_call_is_a_python_block():
    assert python_tool_call('{"location": "beijing", "unit": "celsius"}') == (
        "```python\ntool_call(location='beijing', unit='celsius')\n```"
    )
    assert python_tool_call("not json") == "```python\nnot json\n```"


# ---- ChatGLM-6B: ptuning/main.py preprocess_function_train + build_inputs_with_special_tokens


def chatglm_reference(tok, c, history_column: bool):
    pairs = [(m["content"], n["content"]) for m, n in zip(c["messages"][::2], c["messages"][1::2], strict=True)]
    if c["system"]:
        pairs[0] = (c["system"] + "\n" + pairs[0][0], pairs[0][1])
    *history, (query, answer) = pairs
    if not history_column:
        prompt = query
    else:
        prompt = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
        prompt += f"[Round {len(history)}]\n问：{query}\n答："
    a_ids, b_ids = tok.encode(prompt, add_special_tokens=False), tok.encode(answer, add_special_tokens=False)
    ids = a_ids + tok.convert_tokens_to_ids(["[gMASK]", "<sop>"]) + b_ids + [tok.eos_token_id]
    return ids, [X] * (len(a_ids) + 2) + b_ids + [tok.eos_token_id]


@pytest.mark.parametrize("name", ["plain", "multi_turn", "system", "whitespace", "chinese"])
def test_chatglm_6b_equals_its_ptuning_recipe(tok3, name):
    c = CONVERSATIONS[name]
    single_turn = len(c["messages"]) == 2
    ids, labels = chatglm_reference(tok3, c, history_column=not single_turn)
    enc = build_template("chatglm", tok3).encode(c, cutoff_len=4096)
    assert (enc.input_ids, enc.labels) == (ids, labels)
    assert enc.prompt_ids == ids[: len(ids) - len([x for x in labels if x != X])]


# ---- ChatGLM2-6B: tokenizer.build_prompt + ptuning/main.py preprocess_function_train


def chatglm2_reference(tok, c):
    """THUDM/ChatGLM2-6B: `build_prompt` (tokenization_chatglm.py) renders each earlier round as
    `[Round {i+1}]\\n\\n问：{q}\\n\\n答：{r}\\n\\n` and the last as `[Round {n+1}]\\n\\n问：{query}\\n\\n答：`;
    ptuning/main.py encodes that prompt with the special prefix ([gMASK] sop), the answer without, appends
    EOS, and trains the answer + EOS."""
    pairs = [(m["content"], n["content"]) for m, n in zip(c["messages"][::2], c["messages"][1::2], strict=True)]
    if c["system"]:
        pairs[0] = (c["system"] + "\n" + pairs[0][0], pairs[0][1])
    *history, (query, answer) = pairs
    prompt = "".join(f"[Round {i + 1}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(history))
    prompt += f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："
    a_ids = tok.convert_tokens_to_ids(["[gMASK]", "sop"]) + tok.encode(prompt, add_special_tokens=False)
    b_ids = tok.encode(answer, add_special_tokens=False)
    return a_ids + b_ids + [tok.eos_token_id], [X] * len(a_ids) + b_ids + [tok.eos_token_id]


@pytest.mark.parametrize("name", ["plain", "multi_turn", "system", "whitespace", "chinese"])
def test_chatglm2_equals_its_build_prompt_and_ptuning_recipe(tok3, name):
    c = CONVERSATIONS[name]
    ids, labels = chatglm2_reference(tok3, c)
    enc = build_template("chatglm2", tok3).encode(c, cutoff_len=4096)
    assert (enc.input_ids, enc.labels) == (ids, labels)
