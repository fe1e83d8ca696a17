"""An OpenAI-compatible chat server for a trained GLM (full model or adapter), on FastAPI + uvicorn.

python launch/serve.py --model_name_or_path out/demo --port 8000 [--api_key KEY]

Concurrency model: one model instance, driven by one worker thread; the event loop only parses,
tokenizes (in a thread pool) and relays text, never runs the model. Each request becomes a `Job` in a
bounded queue. The worker runs up to `max_batch_size` jobs as one left-padded `generate()` batch, with
sampling done per row (so any mix of settings shares a batch). Every REBATCH_EVERY_STEPS steps, if jobs
wait and the batch has a free or finished row, it ends that generate() and starts a new batch of the
unfinished jobs (prompt + reply so far, re-prefilled) plus the waiting ones: a short request never
waits for a long reply to end. Each step the worker pushes each job's new text into the job's own
unbounded asyncio queue, so it never waits on a client; a slow reader only grows its own queue (at
most max_tokens pieces). A client that disconnects sets its job's `cancelled` flag; the worker drops
the row at the next step.
"""

import argparse
import asyncio
import collections
import hmac
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dist_glm.errors import UserError, report_and_exit

log = logging.getLogger("dist_glm.serve")
API_KEY_ENV = "DIST_GLM_API_KEY"
MAX_BODY_BYTES = 8 * 2**20  # a chat request is text: 8 MiB is far above any context window
MAX_STOP_SEQUENCES = 4  # the OpenAI limit


# ---------------------------------------------------------------------------------------------
# Text of one reply, token by token
# ---------------------------------------------------------------------------------------------


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that could still grow into a stop sequence."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), default=0)


class ReplyText:
    """Incremental detokenization with stop sequences. Only text that can no longer change is handed
    out: a token may end inside a multi-byte character (decoded as U+FFFD until the next token
    completes it), and text that could be the start of a stop sequence waits for the next token."""

    def __init__(self, decode, stops: tuple[str, ...]):
        self._decode, self._stops = decode, stops
        self._ids: list[int] = []
        self._prefix = self._read = 0  # decode ids[_prefix:] and compare with ids[_prefix:_read]
        self._raw = ""
        self._sent = 0
        self.stop_at: int | None = None  # where the first stop sequence begins in `text`

    @property
    def text(self) -> str:
        # GLM replies start with the newline that follows <|assistant|>; it is not part of the answer.
        return self._raw.removeprefix("\n")

    def add(self, token_id: int) -> None:
        self._ids.append(token_id)
        self._raw += self._new_text(final=False)
        self._find_stop()

    def take(self, final: bool = False) -> str:
        """The text that became certain since the last call (all of it when `final`)."""
        if final:
            self._raw += self._new_text(final=True)
            self._find_stop()
        text = self.text
        if self.stop_at is not None:
            end = self.stop_at
        else:
            end = len(text) if final else len(text) - _held_back(text, self._stops)
        out = text[self._sent : end]
        self._sent = max(self._sent, end)
        return out

    def _new_text(self, final: bool) -> str:
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    def _find_stop(self) -> None:
        if self.stop_at is None:
            hits = [i for s in self._stops if (i := self.text.find(s)) >= 0]
            self.stop_at = min(hits) if hits else None


# ---------------------------------------------------------------------------------------------
# The generation engine: one model, one worker thread
# ---------------------------------------------------------------------------------------------

# A running batch is rebuilt (unfinished rows re-prefilled with their reply so far, waiting requests
# added) when requests wait and the batch has a free or finished row, at most once per this many steps.
# A new request thus waits at most this many decoding steps, never for a long reply to end.
REBATCH_EVERY_STEPS = 8


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None

    @property
    def is_plain_greedy(self) -> bool:
        return self.temperature == 0 and not (self.presence_penalty or self.frequency_penalty or self.logit_bias)


@dataclass(eq=False)
class Job:
    id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stops: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_s: float = field(default_factory=time.monotonic)
    created: int = field(default_factory=lambda: int(time.time()))
    started_s: float = 0.0
    generated: list[int] = field(default_factory=list)  # reply tokens so far (not the end-of-reply token)
    completion_tokens: int = 0
    finish_reason: str | None = None  # stop | length | cancelled | error
    reply: ReplyText | None = None
    rng: torch.Generator | None = None
    largest_batch: int = 0

    def send(self, kind: str, value) -> None:
        # The only way the worker talks to the event loop: never blocks, never waits on the client.
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass


class QueueFull(Exception):
    pass


class _PerRowSampling:
    """Logits processor that does each row's sampling itself, in OpenAI's order: logit_bias,
    presence/frequency penalties over the reply so far, temperature, top_p, then a draw from the job's
    own generator. It returns a one-hot row, so generate() (told to take the argmax) keeps that token.
    Rows of every setting therefore share a batch, and a seeded request gives the same reply whatever
    else runs beside it. Plain greedy rows are left untouched."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for row, job in enumerate(self.jobs):
            s = job.sampling
            if job.finish_reason is not None or s.is_plain_greedy:
                continue
            x = scores[row]
            for token_id, bias in s.logit_bias:
                x[token_id] += bias
            if (s.presence_penalty or s.frequency_penalty) and job.generated:
                counts = torch.bincount(torch.tensor(job.generated), minlength=x.numel()).to(x)
                x -= s.frequency_penalty * counts + s.presence_penalty * (counts > 0).to(x)
            if s.temperature > 0:
                probs = (x / s.temperature).softmax(-1)
                if s.top_p < 1.0:
                    sorted_probs, order = probs.sort(descending=True)
                    outside = sorted_probs.cumsum(-1) - sorted_probs >= s.top_p  # keeps at least the top token
                    probs[order[outside]] = 0.0
                token = torch.multinomial(probs.cpu(), 1, generator=job.rng).item()
                x.fill_(-float("inf"))
                x[token] = 0.0
        return scores


class _Steps:
    """Stopping criterion called by generate() once per step with every row's new token: it advances
    each job (text, stop sequences, max_tokens, cancellation) and says which rows are done. It ends
    the whole generate() early when the batch should be rebuilt to let waiting requests in."""

    def __init__(self, engine: "Engine", jobs: list[Job]):
        self.engine, self.jobs, self.steps = engine, jobs, 0

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        for job, token_id in zip(self.jobs, input_ids[:, -1].tolist(), strict=True):
            if job.finish_reason is None:
                self.engine.advance(job, token_id)
        self.steps += 1
        done = [job.finish_reason is not None for job in self.jobs]
        if self.steps % REBATCH_EVERY_STEPS == 0 and self.engine.has_room(len(done) - sum(done)):
            done = [True] * len(done)  # unfinished rows resume in the next batch
        return torch.tensor(done, device=input_ids.device)


class Engine:
    def __init__(self, model, tokenizer, eos_ids: list[int], max_batch_size: int, max_queue_size: int):
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, set(eos_ids)
        self.backend = tokenizer.backend_tokenizer  # the Rust tokenizer: safe to share between threads
        self.pad_id = tokenizer.pad_token_id
        self.vocab_size = model.config.vocab_size
        self.device = next(model.parameters()).device
        self.max_batch_size, self.max_queue_size = max_batch_size, max_queue_size
        self.default_temperature, self.default_top_p = _take_generation_config(model, eos_ids, self.pad_id)
        self._pending: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self.running = 0
        self.served = 0
        threading.Thread(target=self._work, name="generation", daemon=True).start()

    # -- called from the event loop ------------------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.backend.encode(text, add_special_tokens=False).ids

    def submit(self, job: Job) -> None:
        with self._cv:
            if len(self._pending) >= self.max_queue_size:
                raise QueueFull
            self._pending.append(job)
            self._cv.notify()

    @property
    def waiting(self) -> int:
        return len(self._pending)

    # -- the worker thread -----------------------------------------------------------------------
    def has_room(self, unfinished_rows: int) -> bool:
        return bool(self._pending) and unfinished_rows < self.max_batch_size

    def _take(self, n: int, block: bool) -> list[Job]:
        with self._cv:
            while block and not self._pending:
                self._cv.wait()
            return [self._pending.popleft() for _ in range(min(n, len(self._pending)))]

    def _work(self) -> None:
        running: list[Job] = []
        while True:
            jobs = running + self._take(self.max_batch_size - len(running), block=not running)
            for job in jobs:
                if job.cancelled.is_set():  # the client left while its request waited or was paused
                    self._end(job, "cancelled")
                elif job.reply is None:  # first time in a batch
                    job.started_s = time.monotonic()
                    job.reply = ReplyText(lambda ids: self.backend.decode(ids, skip_special_tokens=True), job.stops)
                    seed = job.sampling.seed
                    job.rng = torch.Generator().manual_seed(seed % 2**63 if seed is not None else _random_seed())
            batch = [job for job in jobs if job.finish_reason is None]
            self.running = len(batch)
            if batch:
                try:
                    self._generate(batch)
                except Exception as e:  # one bad batch (e.g. out of memory) must not kill the server
                    log.exception("generation failed for %s", ", ".join(j.id for j in batch))
                    for job in batch:
                        if job.finish_reason is None:
                            self._end(job, "error", f"generation failed: {type(e).__name__}: {e}")
            running = [job for job in jobs if job.finish_reason is None]
            self.running = len(running)

    @torch.inference_mode()
    def _generate(self, jobs: list[Job]) -> None:
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        for job in jobs:
            job.largest_batch = max(job.largest_batch, len(jobs))
        # A resumed job continues from its prompt plus its reply so far (recomputed: the cheap prefill).
        inputs = [job.prompt_ids + job.generated for job in jobs]
        width = max(len(ids) for ids in inputs)
        # Left padding so that every prompt ends where generation starts.
        ids = torch.tensor([[self.pad_id] * (width - len(x)) + x for x in inputs])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in inputs])
        config = GenerationConfig(
            max_new_tokens=max(job.max_tokens - job.completion_tokens for job in jobs),
            do_sample=False,  # _PerRowSampling has drawn the token already
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
            use_cache=True,
        )
        self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            generation_config=config,
            logits_processor=LogitsProcessorList([_PerRowSampling(jobs)]),
            stopping_criteria=StoppingCriteriaList([_Steps(self, jobs)]),
        )

    def advance(self, job: Job, token_id: int) -> None:
        if job.cancelled.is_set():
            return self._end(job, "cancelled")
        job.completion_tokens += 1
        if token_id in self.eos_ids:
            return self._finish(job, "stop")
        job.generated.append(token_id)
        job.reply.add(token_id)
        if job.reply.stop_at is not None:
            return self._finish(job, "stop")
        if job.completion_tokens >= job.max_tokens:
            return self._finish(job, "length")
        if text := job.reply.take():
            job.send("text", text)

    def _finish(self, job: Job, reason: str) -> None:
        text = job.reply.take(final=True)
        if text:
            job.send("text", text)
        if job.reply.stop_at is not None:
            reason = "stop"  # the flushed end of the reply completed a stop sequence
        self._end(job, reason)

    def _end(self, job: Job, reason: str, error: str = "") -> None:
        """Every job ends here exactly once, with one last event: its handler may still be waiting
        (a non-streamed request whose client left is only ever told through this event)."""
        job.finish_reason = reason
        self.served += 1
        now = time.monotonic()
        log.info(
            "%s: %d prompt + %d completion tokens, finish=%s, batch of up to %d, waited %.2f s, generated in %.2f s",
            job.id,
            len(job.prompt_ids),
            job.completion_tokens,
            job.finish_reason,
            job.largest_batch,
            (job.started_s or now) - job.submitted_s,
            now - (job.started_s or now),
        )
        if error:
            job.send("error", error)
        else:
            job.send("end", (reason, job.completion_tokens))


def _random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") >> 1


def _take_generation_config(model, eos_ids: list[int], pad_id: int) -> tuple[float, float]:
    """Replace the model's generation_config with a neutral one and return the (temperature, top_p)
    defaults it implied. Requests set sampling explicitly, so generation_config.json (which may set
    do_sample, top_k, or use_cache=false left from training) must not leak into generate(). Requests
    that omit temperature/top_p get the checkpoint's own values, as vLLM does (GLM-4 chat samples at
    0.8/0.8; the demo model is greedy)."""
    from transformers import GenerationConfig

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    own = base.generation_config
    defaults = (float(own.temperature or 1.0), float(own.top_p or 1.0)) if own.do_sample else (0.0, 1.0)
    base.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=pad_id, use_cache=True)
    return defaults


# ---------------------------------------------------------------------------------------------
# The HTTP API
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Start-up
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="serve.py", description="OpenAI-compatible chat server for a trained GLM.")
    p.add_argument(
        "--model_name_or_path",
        required=True,
        help="a full model (a training output such as out/demo), or an adapter directory (LoRA, QLoRA, "
        "P-tuning) whose adapter_config.json names its base",
    )
    p.add_argument("--adapter_name_or_path", default="", help="an adapter to apply to model_name_or_path")
    p.add_argument(
        "--served_model_name",
        default="",
        help="the name clients pass as `model` (default: the last directory name of the model path)",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="interface to listen on (default %(default)s); 0.0.0.0 for every interface"
    )
    p.add_argument("--port", type=int, default=8000, help="default %(default)s; 0 picks a free port (printed at start)")
    p.add_argument(
        "--api_key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV}; empty: no key)",
    )
    p.add_argument(
        "--max_model_len",
        type=int,
        default=0,
        help="context limit in tokens, prompt + reply (default: the model's max_position_embeddings)",
    )
    p.add_argument(
        "--max_batch_size", type=int, default=16, help="requests generated together in one batch (default %(default)s)"
    )
    p.add_argument(
        "--max_queue_size", type=int, default=256, help="waiting requests beyond this get 503 (default %(default)s)"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on a GPU that supports it, else float32",
    )
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> list[str]:
    problems = []
    for key in ("model_name_or_path", "adapter_name_or_path"):
        path = getattr(args, key)
        if path and not Path(path).is_dir():
            problems.append(f"{key}='{path}': no such directory; point it at a training output (e.g. out/demo)")
    if not 0 <= args.port <= 65535:
        problems.append(f"port={args.port}: must be in 0..65535 (0 picks a free port)")
    for key in ("max_batch_size", "max_queue_size"):
        if getattr(args, key) < 1:
            problems.append(f"{key}={getattr(args, key)}: must be at least 1")
    if args.max_model_len < 0:
        problems.append(f"max_model_len={args.max_model_len}: must be positive (0: the model's own limit)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"device='{args.device}': no CUDA device is visible; use --device=cpu")
    elif args.device != "auto" and not args.device.startswith(("cpu", "cuda")):
        problems.append(f"device='{args.device}': use auto, cpu, cuda or cuda:N")
    return problems


def bind(host: str, port: int) -> socket.socket:
    """Listen before the model loads, so a taken port fails in a second, not after a minute of loading."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise UserError(
            f"port={port}: cannot listen on {host}:{port} ({e.strerror or e}); pick another --port"
        ) from None
    return sock


def load_engine(args: argparse.Namespace) -> tuple[Engine, int]:
    """(engine, max_model_len) for the checkpoint in args; UserError for anything the user can fix."""
    from dist_glm.inference import load_for_inference
    from dist_glm.models import generation_eos_ids, load_tokenizer

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype != "auto":
        dtype = getattr(torch, args.dtype)
    else:
        dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    model = load_for_inference(args.model_name_or_path, args.adapter_name_or_path, dtype=dtype)
    if not any(getattr(model, a, False) for a in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit")):
        model.to(device)  # bitsandbytes places quantized weights itself; .to() is refused for them
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    tokenizer_dirs = [args.adapter_name_or_path, args.model_name_or_path, base.config.name_or_path]
    tokenizer_dir = next((d for d in tokenizer_dirs if d and (Path(d) / "tokenizer_config.json").is_file()), None)
    if tokenizer_dir is None:
        raise UserError(
            f"model_name_or_path='{args.model_name_or_path}': no tokenizer_config.json there or in its base"
        )
    tokenizer = load_tokenizer(tokenizer_dir)
    if not tokenizer.chat_template:
        raise UserError(f"model_name_or_path='{args.model_name_or_path}': the tokenizer has no chat template")
    limit = int(getattr(base.config, "max_position_embeddings", 0) or 0)
    if args.max_model_len and limit and args.max_model_len > limit:
        raise UserError(f"max_model_len={args.max_model_len}: the model was built for at most {limit} positions")
    max_model_len = args.max_model_len or limit or 4096
    engine = Engine(model, tokenizer, generation_eos_ids(model, tokenizer), args.max_batch_size, args.max_queue_size)
    # One token through the whole path now: a broken checkpoint fails at start-up, not on the first request.
    with torch.inference_mode():
        prompt = torch.tensor([engine.encode_chat([{"role": "user", "content": "hi"}])], device=engine.device)
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1)
    return engine, max_model_len


def main(argv: list[str] | None = None) -> None:
    import sys

    import uvicorn

    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    api_key = os.environ.get(API_KEY_ENV, "") if args.api_key is None else args.api_key
    name = args.served_model_name or Path(args.adapter_name_or_path or args.model_name_or_path).resolve().name
    try:
        problems = check_args(args)
        if problems:
            raise UserError(problems)
        sock = bind(args.host, args.port)
        engine, max_model_len = load_engine(args)
    except UserError as err:
        report_and_exit(err, prog="serve.py")
    app = build_app(engine, name, max_model_len, api_key)
    host, port = sock.getsockname()[:2]
    print(
        f"serve.py: '{name}' on {engine.device} at http://{host}:{port}/v1 (max_model_len {max_model_len}, "
        f"max_batch_size {args.max_batch_size}, {'API key required' if api_key else 'no API key'})",
        flush=True,
    )
    if not api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without an API key: anyone who can reach it can use it", args.host)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=10)
    uvicorn.Server(config).run(sockets=[sock])
