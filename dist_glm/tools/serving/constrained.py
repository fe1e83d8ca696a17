"""Constrained decoding of tool-call arguments (serve.py --tool_call_arguments=constrained): once a GLM-4 reply
has become a call (its first line names an offered tool, or tool_choice named it), only tokens that keep the
arguments a JSON value the tool's `parameters` schema can still accept are allowed, and once that value is
complete, only the end of the call (<|observation|>). The grammar work is xgrammar's (the library vLLM and
SGLang use): a token mask per step from the schema compiled against this tokenizer.

A call can still be cut by max_tokens (finish_reason length); an answer is never constrained.
"""

import functools
import json

import torch


class ArgumentGrammars:
    """One per engine: the tokenizer as xgrammar reads it, and each schema compiled once."""

    def __init__(self, tokenizer, vocab_size: int, end_of_call_id: int):
        import xgrammar  # checked at start-up (serve.check_args)

        self.xgr, self.vocab_size, self.end_of_call_id = xgrammar, vocab_size, end_of_call_id
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgrammar.GrammarCompiler(info)
        self.decode = tokenizer.backend_tokenizer.decode

    @functools.lru_cache(maxsize=256)  # noqa: B019 (one per engine, which lives as long as the server)
    def compiled(self, schema_json: str):
        return self.compiler.compile_json_schema(schema_json, any_whitespace=False)

    def for_reply(self, schemas: dict, forced: str | None) -> "ArgumentConstraint":
        return ArgumentConstraint(self, schemas, forced)


class ArgumentConstraint:
    """One per request: reads the reply token by token (`accept`) and masks the next token's scores (`mask`)
    while the reply is a call's arguments."""

    def __init__(self, grammars: ArgumentGrammars, schemas: dict, forced: str | None):
        self.grammars, self.schemas = grammars, schemas
        self.head = ""  # the reply's text until its first line says answer or call
        self.matcher = None
        self.decided = False
        if forced is not None:  # the prompt ends with the call's name line
            self._start(forced)

    def _start(self, name: str) -> None:
        xgr = self.grammars.xgr
        compiled = self.grammars.compiled(json.dumps(self.schemas[name], sort_keys=True, ensure_ascii=False))
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=[self.grammars.end_of_call_id])
        self.bitmask = xgr.allocate_token_bitmask(1, self.grammars.vocab_size)
        self.decided = True

    def mask(self, scores: torch.Tensor) -> None:
        """Scores of one row, in place: what the arguments' grammar forbids gets -inf."""
        if self.matcher is None or self.matcher.is_terminated():
            return
        self.matcher.fill_next_token_bitmask(self.bitmask)
        row = scores.view(1, -1)
        self.grammars.xgr.apply_token_bitmask_inplace(row, self.bitmask.to(row.device), vocab_size=row.shape[-1])

    def accept(self, token_id: int) -> None:
        if self.matcher is not None:
            if not self.matcher.is_terminated():
                self.matcher.accept_token(token_id)
            return
        if self.decided:
            return
        # GLM opens an answer with a newline and a call with the tool's name line (`{name}\n` or `{name} \n`);
        # the arguments start with the token after the one that ends that line.
        self.head += self.grammars.decode([token_id], skip_special_tokens=False)
        if self.head.startswith("\n"):
            self.decided = True
        elif "\n" in self.head:
            name = self.head.split("\n", 1)[0].strip()
            if name in self.schemas:
                self._start(name)
            self.decided = True
