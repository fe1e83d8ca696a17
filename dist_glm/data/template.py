"""GLM-4 chat template: messages -> input ids and labels (loss on assistant replies only).

    [gMASK]<sop><|system|>\n{system}<|user|>\n{query}<|assistant|>\n{reply}<|user|>...

Each assistant reply is followed by the token that ends the turn; its label is trained so the model
learns to stop. The final turn ends with <|user|>, as THUDM's GLM-4 fine-tuning scripts do; <|user|>
is one of the EOS ids in GLM-4's generation config, so generation stops there. Special tokens are
looked up by name from the tokenizer, never as hard-coded ids.
"""

IGNORE_INDEX = -100


class Glm4Template:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        ids = tokenizer.convert_tokens_to_ids(
            ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
        )
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            raise ValueError("tokenizer lacks GLM-4 special tokens ([gMASK], <sop>, <|user|>, ...)")
        self.prefix = ids[:2]
        self.role_ids = dict(zip(("system", "user", "assistant", "observation"), ids[2:], strict=True))
        self.nl = tokenizer.encode("\n", add_special_tokens=False)

    def _text(self, s: str) -> list[int]:
        return self.tok.encode(s, add_special_tokens=False) if s else []

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """Ids for generation: every message, then the assistant header."""
        ids = list(self.prefix)
        for m in messages:
            ids += [self.role_ids[m["role"]], *self.nl, *self._text(m["content"])]
        return ids + [self.role_ids["assistant"], *self.nl]

    def encode(self, messages: list[dict], cutoff_len: int) -> tuple[list[int], list[int]]:
        """(input_ids, labels) for training. Over-long samples keep the reply: the prompt side is cut
        first, and the reply keeps at least half of cutoff_len."""
        *history, last = messages
        assert last["role"] == "assistant", "the last message of a training sample is the reply"
        prompt = self.encode_prompt(history)
        reply = self._text(last["content"]) + [self.role_ids["user"]]
        if len(prompt) + len(reply) > cutoff_len:
            reply_budget = max(cutoff_len // 2, cutoff_len - len(prompt))
            reply = reply[:reply_budget]
            header = [self.role_ids["assistant"], *self.nl]
            keep = cutoff_len - len(reply) - len(header)
            prompt = prompt[: -len(header)][:keep] + header
        return prompt + reply, [IGNORE_INDEX] * len(prompt) + reply
