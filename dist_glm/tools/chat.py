"""Chatting with a trained result: history, a system prompt and streamed replies (launch/chat.py)."""

import threading
from dataclasses import dataclass

import torch

from dist_glm.config import Command, option
from dist_glm.data.thinking import split_reasoning
from dist_glm.errors import UserError
from dist_glm.models.artifacts import (
    ModelArgs,
    generation_eos_ids_of,
    load_artifact,
    resolve_artifact,
    resolve_dtype,
)
from dist_glm.runtime import environment

CHAT_HELP = "commands: 'clear' starts a new conversation, 'exit' (or Ctrl-D) quits; Ctrl-C stops a reply"


@dataclass
class ChatArgs:
    system: str = option("", "System prompt, the first turn of every conversation.")
    max_new_tokens: int = option(512, "Token budget per reply.")
    do_sample: bool | None = option(None, "Sample instead of greedy decoding (default: the model's generation_config).")
    temperature: float | None = option(None, "Sampling temperature (default: the model's generation_config).")
    top_p: float | None = option(None, "Nucleus sampling top_p (default: the model's generation_config).")


CHAT = Command(
    prog="chat.py",
    usage="chat.py --model_name_or_path=DIR [--adapter_name_or_path=DIR] [--system=TEXT] [--key=value ...]",
    sections={"model": (ModelArgs, None), "chat": (ChatArgs, None)},
    description=CHAT_HELP,
)


class GenerationFailed(Exception):
    """model.generate raised (settings the model rejects, out of memory): the chat cannot go on."""


def check_sampling(args) -> list[str]:
    """Sampling settings generate() would reject, found before the model loads (the same rules as
    transformers' GenerationConfig.validate)."""
    out = []
    if args.max_new_tokens < 1:
        out.append(f"max_new_tokens={args.max_new_tokens} must be at least 1")
    if args.temperature is not None and args.temperature <= 0 and args.do_sample is not False:
        out.append(
            f"temperature={args.temperature} must be positive when sampling; for greedy replies pass "
            "--do_sample=false instead"
        )
    if args.top_p is not None and not 0 < args.top_p <= 1:
        out.append(f"top_p={args.top_p} must be in (0, 1]")
    return out


class ChatSession:
    """A conversation with one model: history, system prompt, streamed replies."""

    def __init__(self, model_args: ModelArgs, args: ChatArgs):
        from dist_glm.models.loading import load_tokenizer

        art = resolve_artifact(model_args.model_name_or_path, model_args.adapter_name_or_path)
        self.args, self.device = args, environment.local_device()
        self.tokenizer = load_tokenizer(str(art.tokenizer_dir), model_args.trust_remote_code)
        self.template = None  # chat renders with the checkpoint's own chat_template, except:
        if not self.tokenizer.chat_template:
            from dist_glm.data.template import build_template, choose_template
            from dist_glm.models.loading import load_config

            # The ChatGLM line published no usable chat_template (ChatGLM3 encodes each message on its own, which a
            # text template cannot say); their prompts are built the way their own chat() builds them.
            model_type = load_config(str(art.base), model_args.trust_remote_code).model_type
            name = choose_template("auto", self.tokenizer, model_type)
            if name not in ("chatglm2", "chatglm3", "chatglm"):
                raise UserError(
                    f"model_name_or_path='{model_args.model_name_or_path}': the tokenizer in {art.tokenizer_dir} has "
                    "no chat_template; copy chat_template.jinja (or tokenizer_config.json) from the original "
                    "checkpoint there"
                )
            self.template = build_template(name, self.tokenizer)
        trust = model_args.trust_remote_code
        dtype = resolve_dtype(model_args.dtype, art, self.device, trust_remote_code=trust)
        self.model = load_artifact(art, dtype, self.device, trust_remote_code=trust)
        self.eos_ids = generation_eos_ids_of(self.model, self.tokenizer)
        self.source = art.source
        self.history: list[dict] = []

    def clear(self) -> None:
        self.history = []

    def _prompt_ids(self, messages: list[dict]) -> list[int]:
        if self.template is not None:
            system = "\n".join(m["content"] for m in messages if m["role"] == "system")
            turns = [m for m in messages if m["role"] != "system"]
            return self.template.encode_prompt({"system": system, "tools": None, "messages": turns})
        enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        return list(enc["input_ids"])

    def _fit(self, query: str) -> tuple[list[int], int, int]:
        """Prompt ids for history + query, dropping the oldest rounds while the reply would have less room
        than max_new_tokens (at most a quarter of the context). Returns (ids, reply budget, rounds dropped)."""
        limit = getattr(self.model.config, "max_position_embeddings", None) or 10**9
        room = min(self.args.max_new_tokens, limit // 4)
        system = [{"role": "system", "content": self.args.system}] if self.args.system else []
        dropped = 0
        while True:
            ids = self._prompt_ids(system + self.history + [{"role": "user", "content": query}])
            if len(ids) + room <= limit or not self.history:
                return ids, max(min(self.args.max_new_tokens, limit - len(ids)), 0), dropped
            self.history = self.history[2:]  # one user + assistant round
            dropped += 1

    def reply(self, query: str, stop: threading.Event):
        """Yield the reply to `query` in pieces as they are generated; record the round in the history
        unless `stop` was set (the reply was interrupted)."""
        from transformers import StoppingCriteria, TextIteratorStreamer

        class StopOnEvent(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return stop.is_set()

        ids, budget, dropped = self._fit(query)
        if dropped:
            yield f"[history too long: dropped the {dropped} oldest round(s)]\n"
        if budget == 0:
            yield f"[message too long: {len(ids)} tokens fill the model's context; send a shorter one]"
            return
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = {k: getattr(self.args, k) for k in ("do_sample", "temperature", "top_p")}
        kwargs = dict(
            input_ids=torch.tensor([ids], device=self.device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.device),
            max_new_tokens=budget,
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            streamer=streamer,
            stopping_criteria=[StopOnEvent()],
            **{k: v for k, v in sampling.items() if v is not None},
        )
        failure: list[BaseException] = []

        def generate():
            try:
                self.model.generate(**kwargs)
            except Exception as e:  # reported by the caller's thread; the streamer must still end
                failure.append(e)
                streamer.end()

        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        text, started = "", False
        for piece in streamer:
            if piece and not started:  # GLM starts a reply with the newline after <|assistant|>
                piece, started = piece.removeprefix("\n"), True
            text += piece
            if piece := show_thinking(piece):
                yield piece
        worker.join()
        if failure:
            raise GenerationFailed(f"generation failed: {type(failure[0]).__name__}: {str(failure[0]).splitlines()[0]}")
        if not stop.is_set():
            # A GLM-4.5-onward reply's thought goes back as reasoning_content, as its chat template expects.
            reasoning, answer = split_reasoning({"content": text})
            message = {"role": "assistant", "content": answer.strip() if reasoning else text}
            if reasoning.strip():
                message["reasoning_content"] = reasoning.strip()
            self.history += [{"role": "user", "content": query}, message]


def show_thinking(piece: str) -> str:
    """A streamed piece as the terminal shows it: a GLM-4.5-onward thought marked [thinking], the answer
    after it [answer]; an empty thought not at all. <think> and </think> are single tokens, so a piece
    never holds half of one."""
    piece = piece.replace("<think></think>", "").replace("<think>", "[thinking] ")
    return piece.replace("</think>", "\n[answer] ")


def chat_loop(session) -> None:
    """The read-reply loop on stdin/stdout. A generation error ends the chat with its one-line reason."""
    import threading

    print(f"[dist_glm] chatting with {session.source}; {CHAT_HELP}", flush=True)
    if session.args.system:
        print(f"[dist_glm] system prompt: {session.args.system}", flush=True)
    while True:
        try:
            query = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D / end of piped input, or Ctrl-C at the prompt
            print()
            return
        if query in ("exit", "quit"):
            return
        if query == "clear":
            session.clear()
            print("[dist_glm] history cleared", flush=True)
            continue
        if not query:
            continue
        print("Assistant: ", end="", flush=True)
        stop = threading.Event()
        pieces = session.reply(query, stop)
        try:
            for piece in pieces:
                print(piece, end="", flush=True)
        except GenerationFailed:
            print(flush=True)
            raise
        except KeyboardInterrupt:  # stop this reply but keep the session; the round is left out of the history
            stop.set()
            for _ in pieces:  # let generation notice the stop and finish before the next prompt
                pass
            print(" [interrupted]", end="")
        print(flush=True)
