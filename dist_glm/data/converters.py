"""Reading local data files into conversations.

A conversation is `{"system": str, "tools": list | None, "messages": [...]}` where each message has a
`role` (`user`, `assistant`, `observation`) and `content`; an assistant message that calls a tool
also has `tool_call = {"name": str, "arguments": str}`. An assistant turn that calls several tools is
one message per call, the second and later marked `same_turn` (the formats of GLM-4.5 onward write them
in one turn; GLM-4's write one turn each). An assistant message may carry `reasoning` (OpenAI's
`reasoning_content`); a conversation may carry `enable_thinking` / `clear_thinking` (booleans, as the
row gives them) for the thinking-era templates.

Formats (detected per file from its first row, or forced with `dataset_format`):
- alpaca: `instruction`, `input`, `output`, optional `system`, `history` ([[query, reply], ...]);
- sharegpt: `conversations` of `{"from", "value"}` (human/gpt/system/function_call/observation), `tools`;
- openai: `messages` of `{"role", "content"}` (system/user/assistant/tool, `tool_calls`), `tools`;
- advertisegen: ChatGLM's `content` -> `summary` (column names from `prompt_column`/`response_column`);
- chatglm3: `conversations` of `{"role", "content"}` (system/user/assistant/observation, `tools`);
- text: raw text for continued pre-training, `{"text": ...}` rows or `.txt` files (one document per
  non-empty line); no chat template, every token trained (dist_glm.data.batching).

json/jsonl are read here so that errors carry the line number; csv and parquet go through Hugging
Face `datasets` (a csv row is reported by its line in the file, the header being line 1; a parquet row
by its number from 1). Every bad row is reported as `file:line: what`.
"""

import json
from collections.abc import Callable

from dist_glm.data.sources import BadRow, read_rows, split_paths
from dist_glm.errors import UserError


def detect_format(row: dict, prompt_column: str) -> str | None:
    if not isinstance(row, dict):
        return None
    if "conversations" in row:
        turns = row["conversations"]
        first = turns[0] if isinstance(turns, list) and turns else {}
        return "sharegpt" if isinstance(first, dict) and "from" in first else "chatglm3"
    if "messages" in row:
        return "openai"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if prompt_column in row:
        return "advertisegen"
    if isinstance(row.get("text"), str):
        return "text"
    return None


def _str(row: dict, key: str, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise BadRow(f"field '{key}' is null; give a string" if key in row else f"missing field '{key}'")
        return ""
    if not isinstance(row[key], str):
        raise BadRow(f"field '{key}' must be a string, got {type(row[key]).__name__}")
    return row[key]


def _tools(value) -> list | None:
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise BadRow("field 'tools' is a string but not valid JSON") from None
    if not isinstance(value, list):
        raise BadRow("field 'tools' must be a list of function descriptions")
    return value


def _tool_call(value) -> dict:
    """A function call given as a JSON string or object with `name` and `arguments`."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise BadRow("a function_call turn must hold JSON with 'name' and 'arguments'") from None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise BadRow("a function_call needs a string 'name'")
    args = value.get("arguments", value.get("parameters", {}))
    return {"name": value["name"], "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}


def from_alpaca(row: dict, cfg) -> dict:
    messages = []
    history = row.get("history") or []
    if not isinstance(history, list):
        raise BadRow("field 'history' must be a list of [query, reply] pairs")
    for pair in history:
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise BadRow("each 'history' entry must be a [query, reply] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    query = "\n".join(x for x in (_str(row, "instruction"), _str(row, "input", required=False)) if x)
    messages += [{"role": "user", "content": query}, {"role": "assistant", "content": _str(row, "output")}]
    return {"system": _str(row, "system", required=False), "tools": None, "messages": messages}


_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "observation": "observation",
    "function_call": "function_call",
    "system": "system",
}


_OPENAI_ROLES = {
    "user": "user",
    "assistant": "assistant",
    "tool": "observation",
    "function": "observation",
    "observation": "observation",
    "system": "system",
}


def _turns(row: dict, key: str, role_key: str, text_key: str, roles: dict) -> dict:
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise BadRow(f"field '{key}' must be a non-empty list of turns")
    system, messages = "", []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRow(f"{key}[{i}] must be an object")
        role = turn.get(role_key)
        if role not in roles:
            raise BadRow(f"{key}[{i}]: unknown role {role!r}; expected one of {', '.join(sorted(roles))}")
        role = roles[role]
        content = _visible_text(turn.get(text_key))
        reasoning = turn.get("reasoning_content", turn.get("reasoning"))
        if reasoning is not None and not isinstance(reasoning, str):
            raise BadRow(f"{key}[{i}].reasoning_content must be a string, got {type(reasoning).__name__}")
        extra = {"reasoning": reasoning} if reasoning is not None and role == "assistant" else {}
        if role == "assistant" and turn.get("tool_calls"):  # OpenAI: an assistant turn that calls tools
            for n, call in enumerate(turn["tool_calls"]):
                fn = call.get("function", call) if isinstance(call, dict) else call
                # The turn's text and reasoning go with its first call (the GLM-4 formats write calls only).
                first = {"content": content if isinstance(content, str) else "", **extra} if n == 0 else {}
                messages.append(
                    {"role": "assistant", "content": "", **first, "tool_call": _tool_call(fn)}
                    | ({"same_turn": True} if n else {})
                )
            continue
        if role == "function_call":
            messages.append({"role": "assistant", "content": "", "tool_call": _tool_call(content)})
            continue
        if role == "assistant" and turn.get("metadata"):  # ChatGLM3: metadata names the called tool
            call = {
                "name": turn["metadata"],
                "arguments": content if isinstance(content, str) else json.dumps(content, ensure_ascii=False),
            }
            messages.append({"role": "assistant", "content": "", "tool_call": _tool_call(call)})
            continue
        if not isinstance(content, str):
            if role == "observation" and content is not None:
                content = json.dumps(content, ensure_ascii=False)
            else:
                raise BadRow(f"{key}[{i}].{text_key} must be a string, got {type(content).__name__}")
        if role == "system":
            if messages:
                raise BadRow(f"{key}[{i}]: a system turn may only come first")
            # Several leading system turns (OpenAI's developer + system) are one system prompt, none dropped.
            system = f"{system}\n{content}" if system else content
            if turn.get("tools"):  # ChatGLM3 keeps tools on the system turn
                row = {**row, "tools": turn["tools"]}
            continue
        if role == "assistant":
            check_think_tags(content, f"{key}[{i}]")
        messages.append({"role": role, "content": content, **extra})
    switches = {k: row[k] for k in ("enable_thinking", "clear_thinking") if isinstance(row.get(k), bool)}
    if "reasoning_effort" in row:  # GLM-5.2's system line, as chat_template_kwargs would pass it
        if row["reasoning_effort"] not in ("max", "high"):
            raise BadRow(f"reasoning_effort is {row['reasoning_effort']!r}; GLM-5.2 knows max and high")
        switches["reasoning_effort"] = row["reasoning_effort"]
    if not system and any(isinstance(t, dict) and roles.get(t.get(role_key)) == "system" for t in turns):
        switches["system_turn"] = True  # an empty system turn still renders `<|system|>` in GLM-4.5's formats
    return {
        "system": system or _str(row, "system", required=False),
        "tools": _tools(row.get("tools")),
        "messages": messages,
        **switches,
    }


def check_think_tags(content: str, where: str) -> None:
    """Reasoning written into the content must be one `<think>...</think>` before the answer; an unclosed
    `<think>` or a stray `</think>` would train the model on half a thought."""
    opened, closed = content.count("<think>"), content.count("</think>")
    if opened != closed or opened > 1 or (closed and content.index("</think>") < content.index("<think>")):
        raise BadRow(
            f"{where}: the reply's reasoning markup is broken ({opened} <think>, {closed} </think>); write the thought "
            "as one <think>...</think> before the answer, or put it in reasoning_content"
        )


def _visible_text(content):
    """OpenAI's content given as a list of parts: their text, joined (as the GLM chat templates do)."""
    if isinstance(content, list) and all(isinstance(p, str | dict) for p in content):
        return "".join(
            p if isinstance(p, str) else str(p.get("text", ""))
            for p in content
            if isinstance(p, str) or p.get("type", "text") == "text"
        )
    return content


def from_sharegpt(row: dict, cfg) -> dict:
    return _turns(row, "conversations", "from", "value", _SHAREGPT_ROLES)


def from_openai(row: dict, cfg) -> dict:
    return _turns(row, "messages", "role", "content", _OPENAI_ROLES)


def from_chatglm3(row: dict, cfg) -> dict:
    return _turns(row, "conversations", "role", "content", _OPENAI_ROLES)


def from_advertisegen(row: dict, cfg) -> dict:
    prompt, response = _str(row, cfg.prompt_column), _str(row, cfg.response_column)
    return {
        "system": "",
        "tools": None,
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
    }


def from_text(row: dict, cfg) -> dict:
    text = _str(row, "text")
    if not text.strip():
        raise BadRow("field 'text' is empty")
    return {"system": "", "tools": None, "messages": [], "text": text}


CONVERTERS: dict[str, Callable[[dict, object], dict]] = {
    "alpaca": from_alpaca,
    "sharegpt": from_sharegpt,
    "openai": from_openai,
    "advertisegen": from_advertisegen,
    "chatglm3": from_chatglm3,
    "text": from_text,
}


def check_alternation(messages: list[dict]) -> None:
    """user -> assistant (a reply or a tool call) -> [observation+ -> assistant]* -> user ..., ending on
    an assistant turn, which is what training learns to produce. Several observations in a row are the
    results of parallel calls; an observation may also stand where a user turn would (LLaMA-Factory's
    sharegpt reader accepts it there, and its own glaive tool-call demo data has it)."""
    expected = {"user"}
    for i, m in enumerate(messages):
        if m["role"] not in expected | ({"observation"} if "user" in expected and i else set()):
            raise BadRow(
                f"turn {i} is '{m['role']}' but expected {' or '.join(sorted(expected))}: the "
                "conversation does not alternate"
            )
        if m["role"] == "user":
            expected = {"assistant"}
        elif m["role"] == "observation":
            expected = {"assistant", "observation"}
        elif m.get("tool_call"):
            expected = {"observation", "assistant"}  # several calls may precede the observations
        else:
            expected = {"user"}
    if not messages or messages[-1]["role"] != "assistant":
        raise BadRow("the conversation must end with an assistant turn")


def _texts(conv: dict):
    yield "system", conv["system"]
    if conv["tools"]:
        yield "tools", json.dumps(conv["tools"], ensure_ascii=False)
    for i, m in enumerate(conv["messages"]):
        yield f"turn {i}", m["content"]
        if m.get("tool_call"):
            yield f"turn {i}'s tool call", m["tool_call"]["name"] + m["tool_call"]["arguments"]


def check_text(conv: dict) -> None:
    """Every string must be text: JSON may escape a lone UTF-16 surrogate (\\ud800), which no tokenizer
    can encode."""
    for where, text in _texts(conv):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = text[e.start : e.end].encode("unicode_escape").decode()
            raise BadRow(f"{where} holds a lone surrogate ({bad}), which is not text; fix the escape") from None


def count_empty_turns(conv: dict) -> int:
    """User or assistant turns with no text (a tool call is not empty): they train as given, but usually
    mean a broken export, so the data summary counts the rows that have them."""
    return sum(
        1
        for m in conv["messages"]
        if m["role"] in ("user", "assistant") and not m.get("tool_call") and not m["content"].strip()
    )


def remap_text(row: dict, mapping: dict) -> dict:
    """A registered row read as a raw document: LLaMA-Factory's pre-training takes its prompt column."""
    column = mapping.get("columns", {}).get("prompt", "instruction")
    if column not in row:
        raise BadRow(f"missing column '{column}' (columns.prompt in dataset_info.json: the text of stage pt)")
    return {"text": row[column]}


def remap(row: dict, mapping: dict) -> dict:
    """A row of a dataset registered in dataset_info.json (dist_glm.data.registry), in the shape the
    converters read: its columns and role tags renamed to ours."""
    cols, tags = mapping.get("columns", {}), mapping.get("tags", {})
    for theirs in ("prompt", "response") if mapping["formatting"] == "alpaca" else ("messages",):
        if theirs in cols and cols[theirs] not in row:  # named by the user: say their name, not ours
            raise BadRow(f"missing column '{cols[theirs]}' (columns.{theirs} in dataset_info.json)")
    if mapping["formatting"] == "alpaca":
        names = {
            "prompt": "instruction",
            "query": "input",
            "response": "output",
            "system": "system",
            "history": "history",
        }
        return {ours: row[cols.get(theirs, ours)] for theirs, ours in names.items() if cols.get(theirs, ours) in row}
    messages = row.get(cols.get("messages", "conversations"), [])
    role_tag, content_tag = tags.get("role_tag", "from"), tags.get("content_tag", "value")
    roles = {
        tags.get("user_tag", "human"): "human",
        tags.get("assistant_tag", "gpt"): "gpt",
        tags.get("observation_tag", "observation"): "observation",
        tags.get("function_tag", "function_call"): "function_call",
        tags.get("system_tag", "system"): "system",
    }
    turns = [
        {"from": roles.get(t.get(role_tag), t.get(role_tag)), "value": t.get(content_tag)} if isinstance(t, dict) else t
        for t in messages
    ] if isinstance(messages, list) else messages  # fmt: skip
    out = {"conversations": turns}
    if cols.get("system") in row:
        out["system"] = row[cols["system"]]
    if cols.get("tools", "tools") in row:
        out["tools"] = row[cols.get("tools", "tools")]
    return out


SHOWN_BAD_ROWS = 10  # bad rows reported at once (each with its file:line); the count covers them all


def as_object(row) -> dict:
    """A read row that must be a JSON object: one that did not parse, or is not an object, is a BadRow."""
    if isinstance(row, BadRow):
        raise row
    if not isinstance(row, dict):
        raise BadRow(f"expected a JSON object, got {type(row).__name__}")
    return row


def bad_rows_error(bad: list[str], noun: str = "rows") -> UserError:
    """One error for every bad row (`file:line: what`), the first few shown, all counted."""
    shown = bad[:SHOWN_BAD_ROWS]
    more = f"; {len(bad) - len(shown)} more" if len(bad) > len(shown) else ""
    return UserError(
        shown[:-1] + [f"{shown[-1]} ({len(bad)} bad {noun}{more}: fix them, or set on_invalid: skip to skip them)"]
    )


def load_conversations(spec: str, data_cfg, skipped: list[dict], formats: dict | None = None) -> list[dict]:
    """All conversations from the comma-separated files in `spec`, in file order. Bad rows raise
    UserError, or with `on_invalid: skip` are appended to `skipped` as {"where", "error"}. `formats`
    receives each file's format."""
    registered = json.loads(getattr(data_cfg, "dataset_columns", "") or "{}")
    out, bad = [], []
    for path in split_paths(spec):
        rows = read_rows(path)
        fmt = data_cfg.dataset_format
        mapping = registered.get(path)
        if mapping is not None and mapping.get("ranking"):
            raise UserError(
                f"{path} is registered as a ranking (preference) dataset in dataset_info.json; train it with "
                "stage: dpo, or register an SFT dataset"
            )
        if mapping is not None:  # a dataset_info.json entry: its own column names, read as ours (row by row)
            # Raw text (LLaMA-Factory's stage pt) reads the entry's prompt column as the document.
            fmt = "text" if fmt == "text" else mapping["formatting"]
        if fmt == "auto":
            first = next((r for _, r in rows if not isinstance(r, BadRow)), None)
            fmt = detect_format(first, data_cfg.prompt_column)
            if fmt is None:
                raise UserError(
                    f"{path}: cannot tell the data format from the first row's fields; set "
                    f"dataset_format to one of {', '.join(CONVERTERS)}"
                )
        if formats is not None:
            formats[path] = fmt
        for lineno, row in rows:
            where = f"{path}:{lineno}"
            try:
                row = as_object(row)
                if mapping is not None:
                    row = remap_text(row, mapping) if fmt == "text" else remap(row, mapping)
                conv = CONVERTERS[fmt](row, data_cfg)
                if "text" not in conv:  # a conversation, not a raw document
                    check_alternation(conv["messages"])
                    check_text(conv)
            except BadRow as e:
                if data_cfg.on_invalid != "skip":
                    bad.append(f"{where}: {e}")  # all of them counted, the first few shown
                    continue
                skipped.append({"where": where, "error": str(e)})
                continue
            conv["where"] = where
            if "text" not in conv and "enable_thinking" not in conv:
                # The dataset's switch (its registry entry), else the run's; a row's own wins over both.
                default = (mapping or {}).get("enable_thinking", getattr(data_cfg, "enable_thinking", None))
                if default is not None:
                    conv["enable_thinking"] = default
            out.append(conv)
    if bad:
        raise bad_rows_error(bad)
    return out
