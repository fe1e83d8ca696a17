"""The OpenAI-compatible HTTP API on FastAPI: request models, routes, auth and OpenAI-shaped error bodies.

The event loop only parses, tokenizes (in a thread pool) and relays text; it never runs the model.
A request is checked, turned into a `Job` and handed to the `Engine` (dist_glm.serving.engine), whose
worker thread pushes the reply's text into the job's own queue; the handler reads that queue and
answers in one body or as server-sent events. The API key and the body size are checked by an ASGI
middleware before the body is read, and every error, ours or FastAPI's, gets OpenAI's error shape so
clients (the `openai` package) report it properly.
"""

import asyncio
import hmac
import json
import logging
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dist_glm.serving.engine import Engine, Job, QueueFull, Sampling

# The server's one logger name, shared by its modules, so log lines read as they always have.
log = logging.getLogger("dist_glm.serve")
MAX_BODY_BYTES = 8 * 2**20  # a chat request is text: 8 MiB is far above any context window
MAX_STOP_SEQUENCES = 4  # the OpenAI limit


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    # "developer" is OpenAI's newer name for "system". Tool calls are not supported.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


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
            if not key.isdigit() or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias maps token ids to values in [-100, 100]; got {key!r}: {bias}")
        return v


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _check_request(req: ChatRequest, served_name: str) -> None:
    if req.model != served_name:
        raise ApiError(
            404,
            f"The model '{req.model}' does not exist; this server serves '{served_name}'.",
            "model",
            "model_not_found",
        )
    if req.n not in (None, 1):
        raise ApiError(400, f"n={req.n}: this server returns one choice per request (n=1); send n requests.", "n")
    if req.logprobs or req.top_logprobs:
        raise ApiError(400, "logprobs are not supported by this server.", "logprobs")
    if req.tools or req.tool_choice not in (None, "none"):
        raise ApiError(400, "tools and tool_choice are not supported by this server.", "tools")
    if req.response_format and req.response_format.get("type") != "text":
        raise ApiError(400, "response_format: only {'type': 'text'} is supported.", "response_format")


def _messages(req: ChatRequest) -> list[dict]:
    out = []
    for m in req.messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def build_app(engine: Engine, served_name: str, max_model_len: int, api_key: str = ""):
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="dist_glm", docs_url=None, redoc_url=None)
    created = int(time.time())
    replying: dict[str, Job] = {}  # requests whose handler is still running (shown by /health)

    def reply_error(status: int, message: str, param=None, code=None) -> JSONResponse:
        return JSONResponse(error_body(status, message, param, code), status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return reply_error(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        problems, params = [], []
        for err in e.errors()[:4]:
            if err["type"] == "json_invalid":
                problems.append(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', err['msg'])})")
                continue
            loc = ".".join(str(p) for p in err["loc"] if p != "body")
            if not loc and err["type"] == "missing":
                problems.append("the request body is empty; send a JSON object")
                continue
            problems.append(f"{loc}: {err['msg']}" if loc else err["msg"])
            params.append(loc)
        return reply_error(400, "; ".join(problems), params[0] if params else None)

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        log.exception("unexpected error")  # a bug: the client still gets an OpenAI-style error body
        return reply_error(500, f"internal error: {type(e).__name__}: {e}")

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        return reply_error(e.status_code, str(e.detail))

    app.add_middleware(_Gate, api_key=api_key)

    def model_card() -> dict:
        return {
            "id": served_name,
            "object": "model",
            "created": created,
            "owned_by": "dist_glm",
            "max_model_len": max_model_len,
        }

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": served_name,
            "replying": len(replying),
            "running": engine.running,
            "waiting": engine.waiting,
            "served": engine.served,
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != served_name:
            raise ApiError(
                404, f"The model '{name}' does not exist; this server serves '{served_name}'.", code="model_not_found"
            )
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        _check_request(req, served_name)
        if req.model_extra:
            log.warning("ignoring unsupported request fields: %s", ", ".join(sorted(req.model_extra)))
        try:  # tokenizing a long prompt takes a while: keep it off the event loop
            prompt_ids = await run_in_threadpool(engine.encode_chat, _messages(req))
        except Exception as e:  # a chat template may reject a conversation (raise_exception in jinja)
            raise ApiError(400, f"messages: the chat template rejected them: {e}", "messages") from None
        job = _job(req, prompt_ids)
        try:
            engine.submit(job)
        except QueueFull:
            raise ApiError(
                503, f"server busy: {engine.max_queue_size} requests are waiting; retry later", code="server_busy"
            ) from None
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _stream(job, request, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        replying[job.id] = job
        try:
            pieces, (reason, completion_tokens) = [], (None, 0)
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    pieces.append(value)
                elif kind == "end":
                    reason, completion_tokens = value
                    break
                else:
                    raise ApiError(500, value)
            if reason == "cancelled":  # the client has gone; this answer reaches no one
                raise ApiError(499, "client closed the request")
        finally:
            watcher.cancel()
            job.cancelled.set()  # no effect once finished; stops the generation if this task was cancelled
            del replying[job.id]
        return {
            **_head(job, "chat.completion"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(pieces)},
                    "logprobs": None,
                    "finish_reason": reason,
                }
            ],
            "usage": _usage(job, completion_tokens),
        }

    def _job(req: ChatRequest, prompt_ids: list[int]) -> Job:
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
        )
        return Job(
            id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
            prompt_ids=prompt_ids,
            max_tokens=max_tokens or max_model_len - n,
            sampling=sampling,
            stops=tuple(req.stop or ()),
            loop=asyncio.get_running_loop(),
        )

    def _head(job: Job, kind: str) -> dict:
        return {"id": job.id, "object": kind, "created": job.created, "model": served_name}

    def _usage(job: Job, completion_tokens: int) -> dict:
        n = len(job.prompt_ids)
        return {"prompt_tokens": n, "completion_tokens": completion_tokens, "total_tokens": n + completion_tokens}

    async def _stream(job: Job, request: Request, include_usage: bool):
        def event(choices: list, usage: dict | None = None) -> str:
            body = {**_head(job, "chat.completion.chunk"), "choices": choices}
            if include_usage:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"

        def choice(delta: dict, reason=None) -> list:
            return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]

        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        replying[job.id] = job
        try:
            yield event(choice({"role": "assistant", "content": ""}))
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    yield event(choice({"content": value}))
                elif kind == "end":
                    reason, completion_tokens = value
                    if reason == "cancelled":
                        return  # the client has gone
                    yield event(choice({}, reason))
                    if include_usage:
                        yield event([], _usage(job, completion_tokens))
                    break
                else:  # the status line is sent already: report the failure in the stream, as vLLM does
                    yield f"data: {json.dumps(error_body(500, value))}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:  # also runs when Starlette cancels the stream because the client went away
            watcher.cancel()
            job.cancelled.set()
            del replying[job.id]

    return app


class _Gate:
    """ASGI middleware in front of every route: the API key on /v1/* and the body size (from
    Content-Length), both checked before the body is read."""

    def __init__(self, app, api_key: str):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"")
            length = headers.get(b"content-length", b"" if scope["method"] in ("POST", "PUT", "PATCH") else b"0")
            if (
                self.api_key
                and scope["path"].startswith("/v1/")
                and not hmac.compare_digest(given, f"Bearer {self.api_key}".encode())
            ):
                message = "Missing or incorrect API key: send 'Authorization: Bearer <key>'."
                return await _send_error(send, 401, message, code="invalid_api_key")
            if not length.isdigit():  # a chunked body could be any size: ask for its length up front
                return await _send_error(send, 411, "Send the body with a Content-Length header.", "length_required")
            if int(length) > MAX_BODY_BYTES:
                message = f"The request body is over {MAX_BODY_BYTES} bytes."
                return await _send_error(send, 413, message, code="request_too_large")
        await self.app(scope, receive, send)


async def _send_error(send, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _cancel_on_disconnect(request, job: Job) -> None:
    """The body is read already, so the next ASGI message is the client's disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancelled.set()
