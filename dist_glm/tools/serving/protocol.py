"""OpenAI's chat-completions wire format as this server speaks it: request models (pydantic), the
checks a request must pass, OpenAI-shaped error bodies, and the response pieces (head, choices, usage).
No FastAPI here: dist_glm.tools.serving.api puts these behind the routes."""

import asyncio
import json
import re
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dist_glm.tools.serving.engine import Engine, Job, Sampling

MAX_STOP_SEQUENCES = 4  # the OpenAI limit
MAX_TOOL_DEPTH = 32  # nesting of a tool's JSON schema; real ones stay under ten levels


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    # "developer" is OpenAI's newer name for "system"; "tool" carries a tool's result back.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # None only on an assistant message with tool_calls
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    reasoning_content: str | None = None  # an earlier reply's thought (GLM-4.5 onward), as vLLM and SGLang take it


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are logged and ignored, as vLLM does

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    # vLLM's and SGLang's way to pass the chat template's switches: enable_thinking, clear_thinking.
    chat_template_kwargs: dict | None = None
    response_format: dict | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_SEQUENCES or any(not s for s in stops):
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} non-empty stop sequences")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, v):
        for key, bias in (v or {}).items():
            # ASCII digits, and few: int() of a 5,000-digit string raises (Python's digit limit).
            if not re.fullmatch(r"[0-9]{1,10}", key) or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias maps token ids to values in [-100, 100]; got {key!r}: {bias}")
        return v


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def check_request(req: ChatRequest, served_name: str) -> None:
    if req.model != served_name:
        raise model_not_found(req.model, served_name, "model")
    if req.n not in (None, 1):
        raise ApiError(400, f"n={req.n}: this server returns one choice per request (n=1); send n requests.", "n")
    if req.logprobs or req.top_logprobs:
        raise ApiError(400, "logprobs are not supported by this server.", "logprobs")
    if req.response_format and req.response_format.get("type") != "text":
        raise ApiError(400, "response_format: only {'type': 'text'} is supported.", "response_format")


def check_size(req: ChatRequest, max_model_len: int, max_token_chars: int) -> None:
    """Before any tokenizing or rendering (a long prompt takes seconds to tokenize): every text is valid
    Unicode, tool schemas nest at most MAX_TOOL_DEPTH deep, and the text is not so long that it cannot
    fit the context (one token stands for at most `max_token_chars` characters)."""
    chars = 0
    for i, m in enumerate(req.messages):
        parts = [m.content] if isinstance(m.content, str) else [p.text for p in m.content or []]
        parts += [f"{c.function.name}{c.function.arguments}" for c in m.tool_calls or []]
        for text in parts:
            _check_unicode(text, f"messages.{i}")
            chars += len(text)
    if req.tools:
        depth = _depth(req.tools)
        if depth > MAX_TOOL_DEPTH:
            raise ApiError(
                400, f"tools: nested {depth} levels deep, over the {MAX_TOOL_DEPTH} this server reads", "tools"
            )
        text = json.dumps(req.tools, ensure_ascii=False)
        _check_unicode(text, "tools")
        chars += len(text)
    if chars > max_model_len * max_token_chars:
        raise ApiError(
            400,
            f"This model's maximum context length is {max_model_len} tokens (--max_model_len); the messages are "
            f"{chars} characters, more than that many tokens can hold. Shorten them.",
            "messages",
            "context_length_exceeded",
        )


def _check_unicode(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(
            400,
            f"{where}: invalid character U+{ord(text[e.start]):04X} (a lone surrogate) at position {e.start}; "
            "send valid Unicode text",
            where,
        ) from None


def _depth(value) -> int:
    """Nesting depth of a JSON value, without recursion (a hostile value may nest thousands deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > MAX_TOOL_DEPTH:
            return deepest
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()
        stack.extend((c, d + 1) for c in children)
    return deepest


def to_messages(req: ChatRequest) -> list[dict]:
    """The messages as plain dicts (text parts joined, developer -> system, tool calls as OpenAI
    writes them), checked for what OpenAI also refuses."""
    out, call_ids = [], set()
    for i, m in enumerate(req.messages):
        if m.tool_calls:
            call_ids = {c.id for c in m.tool_calls if c.id}
        if m.role == "tool" and m.tool_call_id and call_ids and m.tool_call_id not in call_ids:
            raise ApiError(
                400,
                f"messages.{i}.tool_call_id '{m.tool_call_id}' answers no call of the preceding assistant message "
                f"(its calls: {', '.join(sorted(call_ids))})",
                f"messages.{i}.tool_call_id",
            )
        if m.role == "tool" and not (out and (out[-1].get("tool_calls") or out[-1]["role"] == "tool")):
            raise ApiError(
                400,
                f"messages.{i}: a 'tool' message must answer a preceding assistant message with tool_calls",
                f"messages.{i}.role",
            )
        if m.tool_calls and m.role != "assistant":
            raise ApiError(400, f"messages.{i}.tool_calls: only assistant messages call tools", f"messages.{i}")
        if m.content is None and not m.tool_calls:
            raise ApiError(400, f"messages.{i}.content: give the message's text", f"messages.{i}.content")
        content = m.content if isinstance(m.content, str | None) else "".join(p.text for p in m.content)
        message = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.tool_calls:
            message["tool_calls"] = [{"function": c.function.model_dump()} for c in m.tool_calls]
        if m.reasoning_content is not None and m.role == "assistant":
            message["reasoning_content"] = m.reasoning_content
        out.append(message)
    return out


def model_not_found(name: str, served_name: str, param: str | None = None) -> ApiError:
    return ApiError(
        404, f"The model '{name}' does not exist; this server serves '{served_name}'.", param, "model_not_found"
    )


def build_job(
    req: ChatRequest, prompt_ids: list[int], engine: Engine, max_model_len: int, must_call: bool = False
) -> Job:
    """The generation job for a checked request: context limits, logit bias ids and sampling defaults."""
    n = len(prompt_ids)
    if n >= max_model_len:
        raise ApiError(
            400,
            f"This model's maximum context length is {max_model_len} tokens (--max_model_len); "
            f"the messages are {n} tokens. Shorten them.",
            "messages",
            "context_length_exceeded",
        )
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is not None and n + max_tokens > max_model_len:
        raise ApiError(
            400,
            f"This model's maximum context length is {max_model_len} tokens (--max_model_len); "
            f"you requested {n + max_tokens} ({n} in the messages, {max_tokens} for max_tokens). "
            "Lower max_tokens or shorten the messages.",
            "max_tokens",
            "context_length_exceeded",
        )
    bias = tuple(sorted((int(k), v) for k, v in (req.logit_bias or {}).items()))
    if any(k >= engine.vocab_size for k, _ in bias):
        raise ApiError(
            400, f"logit_bias: token ids must be below the vocabulary size {engine.vocab_size}", "logit_bias"
        )
    sampling = Sampling(
        temperature=engine.default_temperature if req.temperature is None else req.temperature,
        top_p=engine.default_top_p if req.top_p is None else req.top_p,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=bias,
        seed=req.seed,
        must_call=must_call,
    )
    return Job(
        id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
        prompt_ids=prompt_ids,
        max_tokens=max_tokens or max_model_len - n,
        sampling=sampling,
        stops=tuple(req.stop or ()),
        loop=asyncio.get_running_loop(),
    )


def head(job: Job, kind: str, served_name: str) -> dict:
    return {"id": job.id, "object": kind, "created": job.created, "model": served_name}


def usage(job: Job, completion_tokens: int) -> dict:
    n = len(job.prompt_ids)
    return {"prompt_tokens": n, "completion_tokens": completion_tokens, "total_tokens": n + completion_tokens}


def model_card(served_name: str, created: int, max_model_len: int) -> dict:
    return {
        "id": served_name,
        "object": "model",
        "created": created,
        "owned_by": "dist_glm",
        "max_model_len": max_model_len,
    }
