"""The OpenAI-compatible HTTP API on FastAPI: routes, auth and OpenAI-shaped errors (the wire format
itself is dist_glm.tools.serving.protocol).

The event loop only parses, tokenizes (in a thread pool) and relays text; it never runs the model.
A request is checked, turned into a `Job` and handed to the `Engine` (dist_glm.tools.serving.engine), whose
worker thread pushes the reply's text into the job's own queue; `Completions` reads that queue and
answers in one body or as server-sent events. The API key and the body size are checked by an ASGI
middleware before the body is read, and every error, ours or FastAPI's, gets OpenAI's error shape so
clients (the `openai` package) report it properly.
"""

import asyncio
import hmac
import json
import logging
import time

from dist_glm.tools.serving import tool_calls
from dist_glm.tools.serving.engine import Engine, Job, QueueFull
from dist_glm.tools.serving.protocol import (
    ApiError,
    ChatRequest,
    build_job,
    check_request,
    check_size,
    error_body,
    head,
    model_card,
    model_not_found,
    to_messages,
    usage,
)
from dist_glm.tools.serving.tool_calls import ToolPlan

# The server's one logger name, shared by its modules, so log lines read as they always have.
log = logging.getLogger("dist_glm.serve")
MAX_BODY_BYTES = 8 * 2**20  # a chat request is text: 8 MiB is far above any context window


class Completions:
    """/v1/chat/completions for one engine: submit the job, then relay its events as one body or a stream."""

    def __init__(self, engine: Engine, served_name: str, max_model_len: int, tool_call_arguments: str = "raw"):
        self.engine, self.served_name, self.max_model_len = engine, served_name, max_model_len
        self.tool_call_arguments = tool_call_arguments  # raw | validate | constrained (serve.py)
        self.replying: dict[str, Job] = {}  # requests whose handler is still running (shown by /health)

    async def submit(self, req: ChatRequest) -> tuple[Job, ToolPlan]:
        from fastapi.concurrency import run_in_threadpool

        check_request(req, self.served_name)
        check_size(req, self.max_model_len, self.engine.max_token_chars)
        if req.model_extra:
            log.warning("ignoring unsupported request fields: %s", ", ".join(sorted(req.model_extra)))
        messages = to_messages(req)
        try:
            tool_plan = tool_calls.plan(req.tools, req.tool_choice, self.engine.template_name)
            schemas = tool_calls.checked_schemas(req.tools) if self.tool_call_arguments != "raw" else None
            # tool_choice "none": the tools are not shown, so the model cannot even try to call one.
            conv = tool_calls.conversation(messages, req.tools if tool_plan.names else None)
        except tool_calls.ToolRequestError as e:
            raise ApiError(400, str(e), e.param) from None
        switches = req.chat_template_kwargs or {}
        for key in ("enable_thinking", "clear_thinking"):
            if key in switches and not isinstance(switches[key], bool):
                raise ApiError(400, f"chat_template_kwargs.{key} must be true or false", f"chat_template_kwargs.{key}")
            if key in switches:
                conv[key] = switches[key]
        if "reasoning_effort" in switches:  # GLM-5.2's system line
            if switches["reasoning_effort"] not in ("max", "high"):
                raise ApiError(
                    400,
                    "chat_template_kwargs.reasoning_effort must be max or high",
                    "chat_template_kwargs.reasoning_effort",
                )
            conv["reasoning_effort"] = switches["reasoning_effort"]
        try:  # tokenizing a long prompt takes a while: keep it off the event loop
            if self.engine.template is not None:
                call = tool_plan.forced or ("" if tool_plan.opened else None)
                prompt_ids = await run_in_threadpool(self.engine.encode_conversation, conv, call)
            elif conv["tools"] or any(m["role"] == "observation" or m.get("tool_call") for m in conv["messages"]):
                raise ApiError(400, "tool calls: this model has no GLM chat template to render them with", "tools")
            else:
                prompt_ids = await run_in_threadpool(self.engine.encode_chat, messages)
            if tool_plan.required:
                await run_in_threadpool(self.engine.not_a_call)
        except ApiError:
            raise
        except Exception as e:  # a chat template may reject a conversation (raise_exception in jinja)
            raise ApiError(400, f"messages: the chat template rejected them: {e}", "messages") from None
        job = build_job(req, prompt_ids, self.engine, self.max_model_len, must_call=tool_plan.required)
        job.make_reply = reply_parser(self.engine.template_name, tool_plan, conv, req.tools, schemas)
        if tool_plan.opened:  # the reply goes on from `<tool_call>`: it must be one of the offered names
            job.constraint = self.engine.name_constraint(sorted(tool_plan.names))
        elif self.tool_call_arguments == "constrained" and tool_plan.names:
            offered = {name: schemas[name] for name in tool_plan.names if name in schemas}
            job.constraint = await run_in_threadpool(self.engine.argument_constraint, offered, tool_plan.forced)
        try:
            self.engine.submit(job)
        except QueueFull:
            raise ApiError(
                503, f"server busy: {self.engine.max_queue_size} requests are waiting; retry later", code="server_busy"
            ) from None
        return job, tool_plan

    async def reply(self, job: Job, tool_plan: ToolPlan, request) -> dict:
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        self.replying[job.id] = job
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
            del self.replying[job.id]
        answer = job.make_reply()
        answer.feed("".join(pieces), job.reply.opened_with_newline if job.reply else None)
        answer.finish()
        choice = {
            "index": 0,
            "message": answer.message(),
            "logprobs": None,
            "finish_reason": answer.finish_reason(reason),
        }
        return {
            **head(job, "chat.completion", self.served_name),
            "choices": [choice],
            "usage": usage(job, completion_tokens),
        }

    async def stream(self, job: Job, tool_plan: ToolPlan, request, include_usage: bool):
        def event(choices: list, totals: dict | None = None) -> str:
            body = {**head(job, "chat.completion.chunk", self.served_name), "choices": choices}
            if include_usage:
                body["usage"] = totals
            return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"

        def choice(delta: dict, reason=None) -> list:
            return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]

        answer = job.make_reply()
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        self.replying[job.id] = job
        try:
            yield event(choice({"role": "assistant", "content": ""}))
            for delta in answer.opening_deltas():
                yield event(choice(delta))
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    for delta in answer.feed(value, job.reply.opened_with_newline):
                        yield event(choice(delta))
                elif kind == "end":
                    reason, completion_tokens = value
                    if reason == "cancelled":
                        return  # the client has gone
                    for delta in answer.finish():
                        yield event(choice(delta))
                    yield event(choice({}, answer.finish_reason(reason)))
                    if include_usage:
                        yield event([], usage(job, completion_tokens))
                    break
                else:  # the status line is sent already: report the failure in the stream, as vLLM does
                    yield f"data: {json.dumps(error_body(500, value))}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:  # also runs when Starlette cancels the stream because the client went away
            watcher.cancel()
            job.cancelled.set()
            del self.replying[job.id]


def reply_parser(template: str | None, tool_plan: ToolPlan, conv: dict, tools: list | None, schemas=None):
    """What sorts a reply's text into the response: GLM-4.5 onward's reasoning, answer and XML calls, or
    GLM-4's answer or call (`schemas`: its arguments validated, tool_calls.ToolReply)."""
    if template in tool_calls.THINKING_TEMPLATES:
        from dist_glm.tools.serving.thinking_replies import ThinkingReply

        thinking = conv.get("enable_thinking") is not False
        return lambda: ThinkingReply(tool_plan, template, thinking, tools)
    return lambda: tool_calls.ToolReply(tool_plan, schemas)


def build_app(engine: Engine, served_name: str, max_model_len: int, api_key: str = "", tool_call_arguments="raw"):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="dist_glm", docs_url=None, redoc_url=None)
    created = int(time.time())
    completions = Completions(engine, served_name, max_model_len, tool_call_arguments)

    def reply_error(status: int, message: str, param=None, code=None) -> JSONResponse:
        return JSONResponse(error_body(status, message, param, code), status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return reply_error(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        return reply_error(400, *_validation_message(e))

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        log.exception("unexpected error")  # a bug: the client still gets an OpenAI-style error body
        return reply_error(500, f"internal error: {type(e).__name__}: {e}")

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        return reply_error(e.status_code, str(e.detail))

    app.add_middleware(_Gate, api_key=api_key)

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": served_name,
            "replying": len(completions.replying),
            "running": engine.running,
            "waiting": engine.waiting,
            "served": engine.served,
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(served_name, created, max_model_len)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != served_name:
            raise model_not_found(name, served_name)
        return model_card(served_name, created, max_model_len)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        job, tool_plan = await completions.submit(req)
        if not req.stream:
            return await completions.reply(job, tool_plan, request)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            completions.stream(job, tool_plan, request, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    _document_our_errors(app, api_key)
    return app


ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
            "required": ["message", "type"],
        }
    },
}
# What each route answers besides 200 (see the handlers above and _Gate).
ROUTE_ERRORS = {
    "/v1/models/{name}": {404: "No model of that name is served."},
    "/v1/chat/completions": {
        400: "Invalid request body or fields (OpenAI-style message naming the param).",
        404: "The requested model is not served here.",
        411: "No Content-Length header.",
        413: "Body over the size limit.",
        499: "The client closed the request.",
        503: "The request queue is full; retry later.",
    },
}


def _document_our_errors(app, api_key: str) -> None:
    """FastAPI documents its own 422 validation response on every route with a body or parameter, but
    this server answers validation errors with 400 and OpenAI's error shape: make /openapi.json say what
    the server really returns."""
    from fastapi.openapi.utils import get_openapi

    def openapi():
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path, operations in spec["paths"].items():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
                    errors = dict(ROUTE_ERRORS.get(path, {}))
                    if api_key and path.startswith("/v1/"):
                        errors[401] = "Missing or incorrect API key."
                    for status, text in errors.items():
                        content = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
                        operation["responses"][str(status)] = {"description": text, "content": content}
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            schemas["Error"] = ERROR_SCHEMA
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi


def _validation_message(e) -> tuple[str, str | None]:
    """FastAPI's validation errors as one OpenAI-style message and the first offending parameter."""
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
    return "; ".join(problems), params[0] if params else None


class _Gate:
    """ASGI middleware in front of every route: the API key on /v1/* and on /openapi.json (only /health is
    open) and the body size (from Content-Length), both checked before the body is read."""

    def __init__(self, app, api_key: str):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"")
            length = headers.get(b"content-length", b"" if scope["method"] in ("POST", "PUT", "PATCH") else b"0")
            if (
                self.api_key
                and (scope["path"].startswith("/v1/") or scope["path"] == "/openapi.json")
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
