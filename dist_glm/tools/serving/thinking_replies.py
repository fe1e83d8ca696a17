"""Replies of the GLM-4.5-onward formats (dist_glm.data.thinking) on the wire: reasoning, answer and XML
tool calls sorted into OpenAI's `reasoning_content`, `content` and `tool_calls`, piece by piece.

A reply is `<think>{reasoning}</think>` (glm4_5 writes `\\n` before it and before the answer; glm4_7's
prompt already ends with `<think>` when thinking is on), then the answer, then each call as
`<tool_call>{name}<arg_key>k</arg_key><arg_value>v</arg_value>...</tool_call>` (glm4_5 with newlines).
Reasoning and answer stream as they are written (a piece that might be the start of a marker is held
until it is not); a call is sent whole when it closes, its arguments as a JSON object: a value is kept
as written when the tool's schema types it `string`, else read as JSON when it parses (numbers, booleans,
objects), as the template wrote non-strings as JSON. `ThinkingReply` has ToolReply's interface
(dist_glm.tools.serving.tool_calls), so the API relays either the same way.
"""

import json
import re
from dataclasses import dataclass, field

from dist_glm.tools.serving.tool_calls import ToolPlan, call_id

THINK_OPEN, THINK_CLOSE, CALL_OPEN, CALL_CLOSE = "<think>", "</think>", "<tool_call>", "</tool_call>"
ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)


def _partial_suffix(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker`."""
    return next((n for n in range(min(len(marker) - 1, len(text)), 0, -1) if marker.startswith(text[-n:])), 0)


def string_params(tools: list | None) -> dict[str, set[str]]:
    """Per tool, the parameters its JSON Schema types as strings (their values are never read as JSON)."""
    out = {}
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else {}
        props = (fn.get("parameters") or {}).get("properties") or {}
        out[fn.get("name")] = {k for k, v in props.items() if isinstance(v, dict) and v.get("type") == "string"}
    return out


def parse_call(text: str, strings: dict[str, set[str]]) -> tuple[str, dict]:
    """(name, arguments) of one call's text between <tool_call> and </tool_call>."""
    name = text.split("<arg_key>", 1)[0].strip()
    args = {}
    for key, value in ARG.findall(text):
        if key in strings.get(name, set()):
            args[key] = value
            continue
        try:
            args[key] = json.loads(value)
        except json.JSONDecodeError:
            args[key] = value
    return name, args


@dataclass
class ThinkingReply:
    plan: ToolPlan
    template: str  # glm4_5, glm4_7, glm5_1, glm5_2 or glmz1
    thinking: bool  # the prompt left thinking on
    tools: list | None = None
    reasoning: str = ""
    content: str = ""
    calls: list[dict] = field(default_factory=list)
    _buf: str = ""
    _phase: str = "start"  # start -> reasoning -> content -> call -> content ...

    def __post_init__(self):
        # glm4_7's prompt ends with <think> (thinking on) or </think> (off); glm4_5's with <|assistant|> (the
        # model opens the thought itself) or <think></think> (off).
        if self.template != "glm4_5":  # GLM-4.7 onward
            self._phase = "reasoning" if self.thinking else "content"
        elif not self.thinking:
            self._phase = "content"
        if self.plan.forced or self.plan.opened:  # the prompt ends with the call's opening (and its name if forced)
            self._phase, self._buf = "call", self.plan.forced or ""
        self._strings = string_params(self.tools)

    def opening_deltas(self) -> list[dict]:
        return []

    def feed(self, piece: str, opened_with_newline: bool | None = None) -> list[dict]:
        self._buf += piece
        return self._drain(final=False)

    def finish(self) -> list[dict]:
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[dict]:
        out = []
        while True:
            before = (self._phase, self._buf)
            out += self._step(final)
            if (self._phase, self._buf) == before:
                return out

    def _step(self, final: bool) -> list[dict]:
        if self._phase == "start":  # glm4_5: a reply opens "\n<think>"; anything else is an answer
            stripped = self._buf.lstrip("\n")
            if stripped.startswith(THINK_OPEN):
                self._buf, self._phase = stripped[len(THINK_OPEN) :], "reasoning"
            elif final or (stripped and not THINK_OPEN.startswith(stripped)):
                self._phase = "content"
            return []
        if self._phase == "reasoning":
            if not self.reasoning:
                self._buf = self._buf.lstrip("\n")  # GLM-Z1 starts its thought on a new line
            return self._until(THINK_CLOSE, "reasoning_content", "content", final)
        if self._phase == "content":
            if not self.content and not self.calls:
                self._buf = self._buf.lstrip("\n")  # the newline before an answer is the format's
            return self._until(CALL_OPEN, "content", "call", final)
        end = self._buf.find(CALL_CLOSE)  # "call": sent whole when it closes
        if end < 0:
            if final:  # cut short (max_tokens): what was written stays visible as text
                text, self._buf, self._phase = CALL_OPEN + self._buf, "", "content"
                self.content += text
                return [{"content": text}]
            return []
        name, args = parse_call(self._buf[:end], self._strings)
        self._buf, self._phase = self._buf[end + len(CALL_CLOSE) :], "content"
        arguments = json.dumps(args, ensure_ascii=False)
        call = {"index": len(self.calls), "id": call_id(), "type": "function",
                "function": {"name": name, "arguments": arguments}}  # fmt: skip
        self.calls.append(call)
        return [{"tool_calls": [call]}]

    def _until(self, marker: str, key: str, next_phase: str, final: bool) -> list[dict]:
        at = self._buf.find(marker)
        if at >= 0:
            text, self._buf, self._phase = self._buf[:at], self._buf[at + len(marker) :], next_phase
        else:
            keep = 0 if final else _partial_suffix(self._buf, marker)
            text, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep :]
        if key == "content" and self.calls:
            text = text.strip()  # between and after calls only whitespace belongs to the format
        if not text:
            return []
        if key == "reasoning_content":
            self.reasoning += text
        else:
            self.content += text
        return [{key: text}]

    def message(self) -> dict:
        message = {"role": "assistant", "content": self.content.strip() or None}
        if self.reasoning.strip():
            message["reasoning_content"] = self.reasoning.strip()
        if self.calls:
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in self.calls]
        elif message["content"] is None:
            message["content"] = ""
        return message

    def finish_reason(self, engine_reason: str) -> str:
        return "tool_calls" if self.calls and engine_reason == "stop" else engine_reason
