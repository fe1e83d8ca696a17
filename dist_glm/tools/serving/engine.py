"""The generation engine: one model instance, driven by one worker thread, serving many requests.

Each request becomes a `Job` in a bounded queue. The worker runs up to `max_batch_size` jobs as one
left-padded `generate()` batch, with sampling done per row (so any mix of settings shares a batch).
Every REBATCH_EVERY_STEPS steps, if jobs wait and the batch has a free or finished row, it ends that
generate() and starts a new batch of the unfinished jobs (prompt + reply so far, re-prefilled) plus the
waiting ones: a short request never waits for a long reply to end. Each step the worker pushes each
job's new text into the job's own unbounded asyncio queue, so it never waits on a client; a slow reader
only grows its own queue (at most max_tokens pieces). A client that disconnects sets its job's
`cancelled` flag; the worker drops the row at the next step.

Nothing here knows about HTTP: `dist_glm.tools.serving.api` turns requests into jobs and events into replies.
"""

import asyncio
import collections
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import torch

# The server's one logger name, shared by its modules, so log lines read as they always have.
log = logging.getLogger("dist_glm.serve")


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
    def opened_with_newline(self) -> bool | None:
        """Whether the reply began with GLM's newline (an answer) rather than a tool's name (a call);
        None until its first character is known."""
        return self._raw.startswith("\n") if self._raw else None

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
    # tool_choice "required" among several tools: the first token may not open an answer (a newline) or
    # end the reply, so the reply starts with a tool's name.
    must_call: bool = False

    @property
    def is_plain_greedy(self) -> bool:
        adjusted = self.presence_penalty or self.frequency_penalty or self.logit_bias or self.must_call
        return self.temperature == 0 and not adjusted


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
    make_reply: object = None  # builds the reply parser (dist_glm.tools.serving.api.reply_parser)
    constraint: object = None  # tool_call_arguments=constrained: its ArgumentConstraint (serving.constrained)

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

    def __init__(self, jobs: list[Job], not_a_call: list[int] | None = None):
        self.jobs, self.not_a_call = jobs, not_a_call

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for row, job in enumerate(self.jobs):
            s = job.sampling
            if job.finish_reason is not None or (s.is_plain_greedy and job.constraint is None):
                continue
            x = scores[row]
            if job.constraint is not None:  # a tool call's arguments: only what its schema can still accept
                job.constraint.mask(x)
            if s.must_call and job.completion_tokens == 0:
                x[self.not_a_call] = -float("inf")
            for token_id, bias in s.logit_bias:
                x[token_id] += bias
            if (s.presence_penalty or s.frequency_penalty) and job.generated:
                counts = torch.bincount(torch.tensor(job.generated), minlength=x.numel()).to(x)
                x -= s.frequency_penalty * counts + s.presence_penalty * (counts > 0).to(x)
            if s.temperature > 0:
                # Shifted by the maximum first: x / 1e-40 overflows to inf and softmax to nan, while
                # (x - max) / t only goes to -inf, which is greedy in the limit, as it should be.
                probs = ((x - x.max()) / s.temperature).softmax(-1)
                if not (torch.isfinite(probs).all() and probs.sum() > 0):  # nothing left to draw from
                    probs = torch.zeros_like(x)
                    probs[x.argmax()] = 1.0
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
    def __init__(self, model, tokenizer, eos_ids: list[int], max_batch_size: int, max_queue_size: int, template=None):
        """`template`: the training template (dist_glm.data.template) that renders conversations, or
        None to render plain chats with the tokenizer's own chat_template (no tool calls then)."""
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, set(eos_ids)
        self.template, self.template_name = template, getattr(template, "name", None)
        self._not_a_call: list[int] | None = None
        self._argument_grammars = None  # built on the first constrained request (serving.constrained)
        self.backend = tokenizer.backend_tokenizer  # the Rust tokenizer: safe to share between threads
        self.pad_id = tokenizer.pad_token_id
        self.vocab_size = model.config.vocab_size
        # The most characters one token stands for: a text longer than max_model_len times this cannot fit
        # the context, which a request is told before anything is tokenized (dist_glm.tools.serving.protocol).
        self.max_token_chars = max(map(len, tokenizer.get_vocab()), default=1)
        self.device = next(model.parameters()).device
        self.max_batch_size, self.max_queue_size = max_batch_size, max_queue_size
        self.default_temperature, self.default_top_p = _take_generation_config(model, eos_ids, self.pad_id)
        self._pending: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self.running = 0
        self.served = 0
        threading.Thread(target=self._work, name="generation", daemon=True).start()

    # -- called from the event loop's thread pool ------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Plain role/content messages through the tokenizer's own chat_template."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_conversation(self, conv: dict, call: str | None = None) -> list[int]:
        """A conversation (the training data's shape) rendered as training renders it, up to the
        assistant header; with `call`, also that tool's name line, so the reply is the call's arguments
        (`call=""`, GLM-4.5 onward: the call's opening only, the reply names the tool)."""
        ids = self.template.encode_prompt(conv)
        return ids + self.template.call_header_ids(call, conv) if call is not None else ids

    def not_a_call(self) -> list[int]:
        """Token ids that cannot start a tool call: those whose text starts with a newline, and the
        end-of-reply ids. Decoded once, the first time a request needs them."""
        if self._not_a_call is None:
            decode = self.backend.decode
            opens = [i for i in range(self.vocab_size) if decode([i], skip_special_tokens=False).startswith("\n")]
            self._not_a_call = sorted(set(opens) | self.eos_ids)
        return self._not_a_call

    def name_constraint(self, names: list[str]):
        """A fresh constraint that makes a reply opened with `<tool_call>` one of these tools' call."""
        from dist_glm.tools.serving.tool_calls import NameConstraint

        return NameConstraint([self.backend.encode(n, add_special_tokens=False).ids for n in names])

    def argument_constraint(self, schemas: dict, forced: str | None):
        """A fresh constraint for one reply's tool-call arguments (tool_call_arguments=constrained)."""
        from dist_glm.tools.serving.constrained import ArgumentGrammars

        if self._argument_grammars is None:
            end_of_call = self.tokenizer.convert_tokens_to_ids("<|observation|>")
            self._argument_grammars = ArgumentGrammars(self.tokenizer, self.vocab_size, end_of_call)
        return self._argument_grammars.for_reply(schemas, forced)

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
                    self._isolate(batch, e)
            running = [job for job in jobs if job.finish_reason is None]
            self.running = len(running)

    def _isolate(self, batch: list[Job], error: Exception) -> None:
        """After a batch failed: which request broke it is unknown, so each unfinished one runs alone once
        (from where it stands); only those that fail alone end with an error, the others carry on."""
        unfinished = [job for job in batch if job.finish_reason is None]
        if len(unfinished) == 1:
            return self._end(unfinished[0], "error", f"generation failed: {type(error).__name__}: {error}")
        for job in unfinished:
            try:
                self._generate([job])
            except Exception as e:
                log.exception("generation failed for %s alone", job.id)
                if job.finish_reason is None:
                    self._end(job, "error", f"generation failed: {type(e).__name__}: {e}")

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
            logits_processor=LogitsProcessorList([_PerRowSampling(jobs, self._not_a_call)]),
            stopping_criteria=StoppingCriteriaList([_Steps(self, jobs)]),
        )

    def advance(self, job: Job, token_id: int) -> None:
        if job.cancelled.is_set():
            return self._end(job, "cancelled")
        if job.constraint is not None:
            job.constraint.accept(token_id)
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
