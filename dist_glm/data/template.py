"""Chat templates: a conversation -> input ids and labels.

GLM-4 (GlmForCausalLM / Glm4ForCausalLM checkpoints):

    [gMASK]<sop><|system|>\\n{system + tools}<|user|>\\n{query}<|assistant|>\\n{reply}<|user|>...
    a tool call:   <|assistant|>{name}\\n{arguments}<|observation|>\\n{result}<|assistant|>\\n{reply}

ChatGLM3 is the same shape with `sop` for `<sop>` and tools as JSON in the system turn. ChatGLM2 and
the original ChatGLM-6B are text rounds (`[Round N]` 问/答, see RoundTextTemplate).

The generation prompt ends at `<|assistant|>`: the model itself writes the newline of a reply or the
name of a tool call, so those are trained. By default every assistant turn is trained, plus the token
that ends it (the next turn's role token, or a final `<|user|>`/EOS) so the model learns to stop;
`<|user|>` and `<|observation|>` are EOS ids in GLM's generation config, so generation stops there.
`mask_history` trains the last assistant turn only; `train_on_prompt` trains everything but the fixed
prefix. Special tokens are looked up by name from the tokenizer, never as hard-coded ids.

Truncation keeps the answer: the oldest rounds go first, and if the last round alone is too long the
reply keeps at least half of `cutoff_len` while the prompt is cut from its end (its header is kept).
"""

import json
from dataclasses import dataclass

IGNORE_INDEX = -100
TEMPLATES = ("auto", "glm4", "chatglm3", "chatglm2", "chatglm")
GLM4_DEFAULT_TOOL_SYSTEM = (
    "你是一个名为 GLM-4 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。"
)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int]  # everything before the last reply, for generation
    reference: str  # the last reply's text, for generation metrics
    truncated: bool


def choose_template(name: str, tokenizer, model_type: str) -> str:
    """`auto`: GLM-4 for the native glm/glm4 classes. `chatglm` checkpoints (remote code) are told apart
    by their tokenizer: `<|user|>` means ChatGLM3, `sop` ChatGLM2, otherwise the original ChatGLM-6B."""
    if name != "auto":
        return name
    if model_type == "chatglm":
        known = set(tokenizer.get_vocab()) | set(getattr(tokenizer, "special_tokens", {}))
        return "chatglm3" if "<|user|>" in known else "chatglm2" if "sop" in known else "chatglm"
    return "glm4"


def _encode_text(tokenizer, s: str) -> list[int]:
    return tokenizer.encode(s, add_special_tokens=False) if s else []


def _ids(tokenizer, names: list[str]) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(names)
    missing = [n for n, i in zip(names, ids, strict=True) if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"the tokenizer lacks the special tokens {missing} that this chat template needs")
    return ids


class RoleTokenTemplate:
    """GLM-4 and ChatGLM3: every turn starts with a role token."""

    def __init__(self, tokenizer, name: str = "glm4", mask_history: bool = False, train_on_prompt: bool = False):
        self.tok, self.name = tokenizer, name
        self.mask_history, self.train_on_prompt = mask_history, train_on_prompt
        prefix_names = ["[gMASK]", "<sop>"] if name == "glm4" else ["[gMASK]", "sop"]
        self.prefix = _ids(tokenizer, prefix_names)
        roles = ("system", "user", "assistant", "observation")
        self.role_ids = dict(zip(roles, _ids(tokenizer, [f"<|{r}|>" for r in roles]), strict=True))
        # GLM-4 ends a conversation with <|user|> (as THUDM's fine-tuning scripts do); ChatGLM3 with EOS.
        self.end_id = self.role_ids["user"] if name == "glm4" else tokenizer.eos_token_id

    def _text(self, s: str) -> list[int]:
        return _encode_text(self.tok, s)

    def _system_text(self, system: str, tools: list | None) -> str:
        if not tools:
            return system
        if self.name == "chatglm3":
            return "\n".join(x for x in (system, json.dumps(tools, indent=4, ensure_ascii=False)) if x)
        parts = [system or GLM4_DEFAULT_TOOL_SYSTEM, "\n\n# 可用工具"]
        for tool in tools:
            fn = tool.get("function", tool) if isinstance(tool, dict) else tool
            name = fn.get("name", "") if isinstance(fn, dict) else ""
            parts.append(
                f"\n\n## {name}\n\n{json.dumps(fn, ensure_ascii=False, indent=4)}\n"
                "在调用上述函数时，请使用 Json 格式表示调用的参数。"
            )
        return "".join(parts)

    def _head(self, conv: dict) -> list[int]:
        """[gMASK]<sop> and, when there is a system prompt or tools, the system turn."""
        system = self._system_text(conv.get("system", ""), conv.get("tools"))
        return self.prefix + ([self.role_ids["system"], *self._text("\n" + system)] if system else [])

    def _message(self, m: dict) -> tuple[list[int], list[int]]:
        """(header ids, body ids) of one message; the header is the role token (plus newline)."""
        role = self.role_ids[m["role"]]
        if m.get("tool_call"):
            call = m["tool_call"]
            return [role], self._text(f"{call['name']}\n{call['arguments']}")
        return [role], self._text("\n" + m["content"])

    def encode_prompt(self, conv: dict) -> list[int]:
        """Ids for generation: the conversation so far, then the assistant header."""
        ids = self._head(conv)
        for m in conv["messages"]:
            header, body = self._message(m)
            ids += header + body
        return ids + [self.role_ids["assistant"]]

    def encode(self, conv: dict, cutoff_len: int) -> Encoded:
        messages = conv["messages"]
        last_reply = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        head = self._head(conv)
        # Rounds: (token ids, labels), each ending with one assistant turn.
        rounds, ids, labels, prev_trained = [], [], [], False
        for i, m in enumerate(messages):
            header, body = self._message(m)
            is_reply = m["role"] == "assistant"
            trained = is_reply and (not self.mask_history or i == last_reply)
            # A role token that follows a trained reply is that reply's terminator, so it is trained.
            header_label = header if (prev_trained or self.train_on_prompt) else [IGNORE_INDEX] * len(header)
            body_label = body if (trained or self.train_on_prompt) else [IGNORE_INDEX] * len(body)
            reply_start = len(ids) + len(header)
            ids, labels = ids + header + body, labels + header_label + body_label
            prev_trained = trained
            if is_reply:
                rounds.append((ids, labels, reply_start))
                ids, labels = [], []
        end_label = self.end_id if (prev_trained or self.train_on_prompt) else IGNORE_INDEX
        last = rounds[-1]
        rounds[-1] = (last[0] + [self.end_id], last[1] + [end_label], last[2])
        head_labels = list(head) if self.train_on_prompt else [IGNORE_INDEX] * len(head)
        head_labels[: len(self.prefix)] = [IGNORE_INDEX] * len(self.prefix)
        # Truncation keeps the <|assistant|> token that ends the prompt.
        input_ids, out_labels, truncated = _fit(head, head_labels, rounds, cutoff_len, header_len=1)
        prompt = self.encode_prompt({**conv, "messages": messages[:last_reply]})
        reply = messages[last_reply]
        reference = (
            reply["content"]
            if not reply.get("tool_call")
            else f"{reply['tool_call']['name']}\n{reply['tool_call']['arguments']}"
        )
        return Encoded(input_ids, out_labels, prompt, reference, truncated)


class RoundTextTemplate:
    """ChatGLM2 and ChatGLM-6B text rounds, as their official fine-tuning scripts build them: earlier
    rounds are prompt text (untrained unless train_on_prompt), the last reply plus EOS is trained.

    ChatGLM2: `[gMASK]sop[Round 1]\n\n问：q\n\n答：r` (rounds from 1, blank-line separated).
    ChatGLM-6B: `[Round 0]\n问：q\n答：[gMASK]<sop>r` (rounds from 0; [gMASK]<sop> follow the prompt).
    """

    def __init__(self, tokenizer, version: int, train_on_prompt: bool = False):
        self.tok, self.train_on_prompt = tokenizer, train_on_prompt
        self.sep, self.first_round = ("\n\n", 1) if version == 2 else ("\n", 0)
        marks = _ids(tokenizer, ["[gMASK]", "sop" if version == 2 else "<sop>"])
        self.head, self.tail = (marks, []) if version == 2 else ([], marks)
        self.header_len = len(self._text(f"{self.sep}答：")) + len(self.tail)

    def _text(self, s: str) -> list[int]:
        return _encode_text(self.tok, s)

    def _pairs(self, conv: dict) -> list[tuple[str, str]]:
        msgs = [m for m in conv["messages"] if m["role"] in ("user", "assistant")]
        pairs = [(msgs[i]["content"], msgs[i + 1]["content"]) for i in range(0, len(msgs) - 1, 2)]
        if conv.get("system") and pairs:
            pairs[0] = (conv["system"] + "\n" + pairs[0][0], pairs[0][1])
        return pairs

    def _round(self, i: int, query: str) -> str:
        return f"[Round {i + self.first_round}]{self.sep}问：{query}{self.sep}答："

    def encode_prompt(self, conv: dict) -> list[int]:
        pairs = self._pairs({**conv, "messages": conv["messages"] + [{"role": "assistant", "content": ""}]})
        history = "".join(self._round(i, q) + r + self.sep for i, (q, r) in enumerate(pairs[:-1]))
        return self.head + self._text(history + self._round(len(pairs) - 1, pairs[-1][0])) + self.tail

    def encode(self, conv: dict, cutoff_len: int) -> Encoded:
        pairs, rounds = self._pairs(conv), []
        for i, (q, r) in enumerate(pairs):
            is_last = i == len(pairs) - 1
            prompt = self._text(self._round(i, q)) + (self.tail if is_last else [])
            reply = self._text(r) + ([self.tok.eos_token_id] if is_last else self._text(self.sep))
            reply_labels = reply if (is_last or self.train_on_prompt) else [IGNORE_INDEX] * len(reply)
            prompt_labels = prompt if self.train_on_prompt else [IGNORE_INDEX] * len(prompt)
            rounds.append((prompt + reply, prompt_labels + reply_labels, len(prompt)))
        ids, labels, truncated = _fit(self.head, [IGNORE_INDEX] * len(self.head), rounds, cutoff_len, self.header_len)
        prompt = self.encode_prompt({**conv, "messages": conv["messages"][:-1]})
        return Encoded(ids, labels, prompt, pairs[-1][1], truncated)


def _fit(head, head_labels, rounds, cutoff_len: int, header_len: int) -> tuple[list[int], list[int], bool]:
    """Join head + rounds [(ids, labels, reply_start)] within cutoff_len: drop the oldest rounds first,
    then split the last round between prompt and reply so the reply keeps at least half the budget.
    The prompt is cut from its end but keeps its last `header_len` tokens (the assistant header)."""
    truncated = len(head) + sum(len(r[0]) for r in rounds) > cutoff_len
    while len(rounds) > 1 and len(head) + sum(len(r[0]) for r in rounds) > cutoff_len:
        rounds = rounds[1:]
        # A trained terminator of the dropped round would now have nothing before it to predict it.
        first_ids, first_labels, first_start = rounds[0]
        rounds[0] = (first_ids, [IGNORE_INDEX] + first_labels[1:], first_start)
    ids, labels = list(head), list(head_labels)
    for r_ids, r_labels, _ in rounds[:-1]:
        ids, labels = ids + r_ids, labels + r_labels
    last_ids, last_labels, start = rounds[-1]
    if len(ids) + len(last_ids) <= cutoff_len:
        return ids + last_ids, labels + last_labels, truncated
    prompt_ids, prompt_labels = ids + last_ids[:start], labels + last_labels[:start]
    reply_ids, reply_labels = last_ids[start:], last_labels[start:]
    reply_budget = min(len(reply_ids), max(cutoff_len // 2, cutoff_len - len(prompt_ids)))
    keep = max(cutoff_len - reply_budget - header_len, 0)
    cut_ids = prompt_ids[:keep] + prompt_ids[-header_len:]
    cut_labels = prompt_labels[:keep] + prompt_labels[-header_len:]
    return cut_ids + reply_ids[:reply_budget], cut_labels + reply_labels[:reply_budget], True


def build_template(name: str, tokenizer, mask_history: bool = False, train_on_prompt: bool = False):
    if name in ("chatglm2", "chatglm"):
        return RoundTextTemplate(tokenizer, 2 if name == "chatglm2" else 1, train_on_prompt)
    return RoleTokenTemplate(tokenizer, name, mask_history, train_on_prompt)


def chat_template_mismatch(template, tokenizer) -> str | None:
    """When the tokenizer ships a chat_template, check that our encoding of a probe prompt equals the
    tokenizer's own rendering; a difference means the checkpoint expects another format."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    probe = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"}]
    try:
        theirs = list(
            tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=True, return_dict=False)
        )
    except Exception as e:  # a remote-code tokenizer's template may not render plain messages at all
        return f"the tokenizer's chat_template could not render a probe conversation ({e})"
    ours = template.encode_prompt({"system": probe[0]["content"], "messages": probe[1:]})
    if ours == theirs:
        return None
    return (
        f"the tokenizer's own chat_template renders a probe prompt as {tokenizer.decode(theirs)!r} but the "
        f"chosen template gives {tokenizer.decode(ours)!r}; check the `template` setting"
    )
