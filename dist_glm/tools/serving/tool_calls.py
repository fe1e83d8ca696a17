"""Tool calls on the wire: OpenAI's `tools`, `tool_choice`, assistant `tool_calls` and `tool` messages
in; GLM's own tool-call replies out as `tool_calls`.

A request becomes the same conversation a training row becomes (dist_glm.data.converters reads OpenAI
messages for both), so the server renders it with the training template: what the model sees when
served is what it saw when it was fine-tuned. GLM-4 writes a tool call as its reply's metadata line,
`<|assistant|>{name}\\n{arguments}` (GLM-4-0414: `{name} \\n{arguments}`), and a plain answer as
`<|assistant|>\\n{content}`, so the first line of a reply tells the two apart: empty means an answer, a
tool's name means a call, and anything else is returned as text. `ToolReply` makes that decision as
the text arrives, so a stream carries the call's arguments as they are written.
"""

import json
import uuid
from dataclasses import dataclass, field

from dist_glm.data.converters import from_openai
from dist_glm.data.sources import BadRow

# Templates whose reply format this module parses (ChatGLM3 writes a python block; ChatGLM2/6B have no tools).
TOOL_TEMPLATES = ("glm4", "glm4_0414", "glm4_5", "glm4_7", "glm5_1", "glm5_2")
# Their replies are read by dist_glm.tools.serving.thinking_replies (glmz1: reasoning and answer, no tools).
THINKING_TEMPLATES = ("glm4_5", "glm4_7", "glm5_1", "glm5_2", "glmz1")


class ToolRequestError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolPlan:
    """What a request asks of tools: the names the reply may call (none: plain text only) and, for a
    named or single `required` tool, the call the reply is made to start with."""

    names: frozenset[str] = frozenset()
    forced: str | None = None  # the reply is this tool's call: its name is written into the prompt
    required: bool = False  # a call to some tool must come (several tools, tool_choice "required")
    # GLM-4.5 onward, "required" among several tools: the prompt ends with an empty thought and the call's
    # opening (`<tool_call>`), and the reply's first tokens are held to one of the tools' names (NameConstraint).
    opened: bool = False


def tool_names(tools: list) -> list[str]:
    names = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise ToolRequestError(f"tools[{i}]: each tool is {{'type': 'function', 'function': {{...}}}}", "tools")
        if not isinstance(fn.get("name"), str) or not fn["name"].strip() or "\n" in fn["name"]:
            raise ToolRequestError(f"tools[{i}].function.name: a non-empty name on one line is required", "tools")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise ToolRequestError(
                f"tools[{i}].function.parameters: a JSON Schema object is required (OpenAI's rule), "
                f"e.g. {{'type': 'object', 'properties': {{}}}}",
                "tools",
            )
        names.append(fn["name"])
    if len(set(names)) != len(names):
        raise ToolRequestError("tools: two tools have the same name", "tools")
    return names


def plan(tools: list | None, tool_choice, template: str | None) -> ToolPlan:
    """Check `tools` / `tool_choice` (OpenAI's rules) and say what the reply may be."""
    choice = "auto" if tool_choice is None else tool_choice
    if not tools:
        if choice not in ("auto", "none"):
            raise ToolRequestError("tool_choice needs tools: send the tools the reply may call", "tool_choice")
        return ToolPlan()
    names = tool_names(tools)
    if template not in TOOL_TEMPLATES:
        raise ToolRequestError(
            f"tools: this model's chat template ({template or 'the tokenizer own'}) has no tool calls this server "
            f"can read; tool calls are served for the {' and '.join(TOOL_TEMPLATES)} templates",
            "tools",
        )
    if choice == "none":
        return ToolPlan()
    if choice == "auto":
        return ToolPlan(frozenset(names))
    if choice == "required":
        several = len(names) > 1
        opened = several and template in THINKING_TEMPLATES
        return ToolPlan(frozenset(names), forced=None if several else names[0], required=several, opened=opened)
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise ToolRequestError(
            "tool_choice: 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': NAME}}", "tool_choice"
        )
    if name not in names:
        raise ToolRequestError(f"tool_choice names '{name}', which is not among the tools", "tool_choice")
    return ToolPlan(frozenset(names), forced=name)


def conversation(messages: list[dict], tools: list | None) -> dict:
    """OpenAI messages (already plain dicts) -> the training data's conversation. `tools` is None when
    the tools are not to be shown to the model (tool_choice "none")."""
    try:
        return from_openai({"messages": messages, "tools": tools}, None)
    except BadRow as e:
        raise ToolRequestError(f"messages: {e}", "messages") from None


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolReply:
    """One reply's text sorted into content or a tool call, piece by piece. `feed` returns the stream
    deltas for a piece (OpenAI's chunk shape); `message` gives the whole reply at the end.

    `opened_with_newline` comes from the engine: GLM starts an answer with "\\n", which the engine
    drops from the text, and a call with the tool's name."""

    plan: ToolPlan
    # tool_call_arguments=validate: each offered tool's `parameters` JSON schema. A call is then held back until
    # it is complete and sent only if its arguments are a JSON value its schema accepts; otherwise the reply is
    # returned as the text GLM wrote, with `invalid_tool_call` saying why.
    schemas: dict | None = None
    content: str = ""
    name: str | None = None
    arguments: str = ""
    id: str = field(default_factory=call_id)
    invalid: dict | None = None
    _head: str = ""  # text held back until its first line says answer or call
    _decided: bool = False

    def __post_init__(self):
        if self.plan.forced:  # the prompt already ends with the call's name line
            self.name, self._decided = self.plan.forced, True

    def feed(self, piece: str, opened_with_newline: bool | None) -> list[dict]:
        if not self._decided:
            if opened_with_newline or not self.plan.names:
                self._decided = True
                return self._text(piece)
            self._head += piece
            if "\n" not in self._head:
                return []
            return self._decide()
        return self._args(piece) if self.name is not None else self._text(piece)

    def finish(self) -> list[dict]:
        """Deltas for text still held back when the reply ends."""
        deltas = [] if self._decided else self._decide()
        if self.schemas is None or self.name is None:
            return deltas
        error = argument_error(self.arguments, self.schemas.get(self.name))
        if error is None:
            return [self._header(), *self._args_delta(self.arguments)]
        self.invalid = {"name": self.name, "arguments": self.arguments, "error": error}
        self.name = None
        text = f"{self.invalid['name']}\n{self.arguments}"
        return [{**self._text(text)[0], "invalid_tool_call": self.invalid}]

    def _decide(self) -> list[dict]:
        self._decided = True
        first, newline, rest = self._head.partition("\n")
        held, self._head = self._head, ""
        if first.strip() in self.plan.names:
            self.name = first.strip()
            opening = [] if self.schemas is not None else [self._header()]  # validate: sent with the whole call
            return opening + (self._args(rest) if rest else [])
        return self._text(held)

    def _header(self) -> dict:
        call = {"index": 0, "id": self.id, "type": "function", "function": {"name": self.name, "arguments": ""}}
        return {"tool_calls": [call]}

    def _text(self, piece: str) -> list[dict]:
        self.content += piece
        return [{"content": piece}] if piece else []

    def _args(self, piece: str) -> list[dict]:
        self.arguments += piece
        return self._args_delta(piece) if self.schemas is None else []

    @staticmethod
    def _args_delta(piece: str) -> list[dict]:
        return [{"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}] if piece else []

    def opening_deltas(self) -> list[dict]:
        """A forced call's header, sent before any generated text (with validate, with the whole call)."""
        return [self._header()] if self.plan.forced and self.schemas is None else []

    def message(self) -> dict:
        if self.name is None:
            invalid = {"invalid_tool_call": self.invalid} if self.invalid else {}
            return {"role": "assistant", "content": self.content, **invalid}
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return {"role": "assistant", "content": None, "tool_calls": [call]}

    def finish_reason(self, engine_reason: str) -> str:
        # A call ends at <|observation|> (an end-of-reply token): OpenAI says "tool_calls"; a call cut
        # by max_tokens stays "length" so the client knows its arguments are incomplete.
        return "tool_calls" if self.name is not None and engine_reason == "stop" else engine_reason


def checked_schemas(tools: list | None) -> dict:
    """Each offered tool's `parameters` schema by name (an object of any shape where a tool gives none), each
    checked to be a JSON schema: a broken one is the request's mistake (400), not the model's."""
    import jsonschema

    out = {}
    for i, tool in enumerate(tools or []):
        fn = tool.get("function", tool) if isinstance(tool, dict) else {}
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str)):
            continue
        schema = fn.get("parameters") or {"type": "object"}
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except (jsonschema.SchemaError, TypeError) as e:
            message = getattr(e, "message", str(e))
            raise ToolRequestError(f"tools[{i}].function.parameters is not a JSON schema: {message}", "tools") from None
        out[fn["name"]] = schema
    return out


def argument_error(arguments: str, schema: dict | None) -> str | None:
    """Why `arguments` is not a call of a tool with `schema` (its JSON, then the schema's verdict), or None."""
    import jsonschema

    try:
        value = json.loads(arguments)
    except json.JSONDecodeError as e:
        return f"arguments are not JSON ({e.msg} at character {e.pos})"
    try:
        jsonschema.validate(value, schema or {"type": "object"})
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        return f"arguments do not match the tool's parameters schema{f' at {where}' if where else ''}: {e.message}"
    return None


class NameConstraint:
    """tool_choice "required" on GLM-4.5 onward: the prompt ends with `<tool_call>`, and the reply's first
    tokens must spell one of the offered tools' names as the tokenizer writes them (after that special
    token a name is tokenized on its own). Once a whole name is written the reply is free (its arguments).
    The same interface as constrained.ArgumentConstraint: `mask` a row's scores, `accept` the token drawn."""

    def __init__(self, names: list[list[int]]):
        self.names, self.written = [n for n in names if n], []

    def _open(self) -> list[list[int]]:
        k = len(self.written)
        return [n for n in self.names if n[:k] == self.written]

    def mask(self, scores) -> None:
        k = len(self.written)
        candidates = self._open()
        if not candidates or any(len(n) == k for n in candidates):  # a name is complete: free from here
            return
        allowed = sorted({n[k] for n in candidates})
        keep = scores[allowed].clone()
        scores.fill_(-float("inf"))
        scores[allowed] = keep

    def accept(self, token_id: int) -> None:
        if self._open() and not any(len(n) == len(self.written) for n in self._open()):
            self.written.append(token_id)
