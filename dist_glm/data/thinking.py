"""The chat formats of GLM-4.5 onward, with thinking and XML tool calls.

- `glm4_5`: GLM-4.5, GLM-4.5-Air, GLM-4.6. A newline after every role token; an assistant turn is
  `\\n<think>{reasoning}</think>` (or `\\n<think></think>`), `\\n{answer}`, then each tool call as
  `\\n<tool_call>{name}\\n<arg_key>k</arg_key>\\n<arg_value>v</arg_value>\\n...</tool_call>`; tool results
  `\\n<tool_response>\\n{result}\\n</tool_response>` under one `<|observation|>`; thinking switched off
  appends `/nothink` to each user turn. Generation prompt `<|assistant|>` (`<|assistant|>\\n<think></think>`
  with thinking off).
- `glm4_7`: GLM-4.7, GLM-4.7-Flash, GLM-5. No newlines after role tokens; an empty thought is `</think>`
  alone; calls `<tool_call>{name}<arg_key>k</arg_key><arg_value>v</arg_value></tool_call>`; results
  `<tool_response>{result}</tool_response>`; `clear_thinking=false` keeps earlier turns' reasoning.
  Generation prompt `<|assistant|><think>` (`<|assistant|></think>` with thinking off).
- `glm5_1`: GLM-5.1. GLM-4.7's format; each tool in the tool list is the function itself, unwrapped from
  OpenAI's `{"type": "function", "function": {...}}`.
- `glm5_2`: GLM-5.2. GLM-5.1's, plus a first system turn `Reasoning Effort: Max` (or `High`: the row's
  `reasoning_effort`, default max) when thinking is on; an empty thought is `<think></think>`.
- `glmz1`: GLM-Z1-0414 (dense `Glm4ForCausalLM`), GLM-4-0414's turns (`<|role|>\n{content}`) in a thinking
  mode it cannot leave: every earlier message is shown as its text after any `</think>`, stripped (its
  template's `visible`), system messages as written; the generation prompt is `<|assistant|>\n<think>`. A
  reply continues that as `\n{reasoning}\n</think>\n\n{answer}` (the `<think>\n` first line its model card
  names, DeepSeek-R1's closing; the official template never renders a thought, so no reference fixes these
  newlines); it is encoded after the prompt's own `\n<think>`, as generation sees it. GLM-Z1 publishes no
  tool-call format (tools are refused), and no switch turns its thinking off.

All keep reasoning only for the assistant turns after the last user turn (unless clear_thinking is
false on glm4_7); reasoning comes from the message's `reasoning` or is split out of `<think>...</think>`
in its content, as the official templates do. Argument values that are not strings are written as JSON.
tests/data/official_renderings/ holds the official templates' renderings these must equal.

What is trained: every assistant turn whose text is the one the model saw (its reasoning shown, or it had
none), from just after `<|assistant|>` to the role token that ends it (`<|user|>` or `<|observation|>`,
appended after the last turn). An earlier assistant turn whose reasoning the format hides is not trained,
so the model is never taught to answer without the thought it had; the log counts such turns.
"""

import json

from dist_glm.data.encoding import IGNORE_INDEX, Encoded, _encode_text, _fit, _ids
from dist_glm.errors import UserError

FORMATS = ("glm4_5", "glm4_7", "glm5_1", "glm5_2", "glmz1")
# Formats that cannot switch thinking off (enable_thinking=false is refused for them).
ALWAYS_THINKING = ("glmz1",)
# GLM-Z1's generation prompt, after <|assistant|>: encoded on its own, as the model is prompted with it.
Z1_OPEN = "\n<think>"
# The GLM-5.2 reasoning effort values the official template tells apart (any other it treats as max).
REASONING_EFFORTS = ("max", "high")
TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
TOOLS_OUTRO = (
    "</tools>\n\nFor each function call, output the function name and arguments within the following XML format:\n"
)
CALL_EXAMPLE = {
    "glm4_5": "<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}</arg_value>\n"
    "<arg_key>{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>",
    "glm4_7": "<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}</arg_value>"
    "<arg_key>{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>...</tool_call>",
}


def unwrap(tool):
    """GLM-5.1 onward list a tool as its function: OpenAI's `{"type": "function", "function": f}` -> f."""
    if isinstance(tool, dict) and "type" in tool and isinstance(tool.get("function"), dict):
        return tool["function"]
    return tool


def reasoning_effort(conv: dict) -> str:
    effort = conv.get("reasoning_effort", "max")
    if effort not in REASONING_EFFORTS:
        raise UserError(
            f"reasoning_effort={effort!r}: GLM-5.2's template knows {' and '.join(REASONING_EFFORTS)}; give one of them"
        )
    return effort


def split_reasoning(message: dict) -> tuple[str, str]:
    """(reasoning, answer) of an assistant message: `reasoning` if given, else `<think>...</think>` split
    out of the content (what precedes `</think>`, after the last `<think>`)."""
    content = message.get("content") or ""
    if isinstance(message.get("reasoning"), str):
        return message["reasoning"], content
    if "</think>" in content:
        head, _, _ = content.partition("</think>")
        return head.rstrip("\n").split("<think>")[-1].lstrip("\n"), content.split("</think>")[-1].lstrip("\n")
    return "", content


class ThinkingTemplate:
    def __init__(
        self,
        tokenizer,
        name: str,
        mask_history: bool = False,
        train_on_prompt: bool = False,
        reasoning_history="expand",
    ):
        self.tok, self.name, self.reasoning_history = tokenizer, name, reasoning_history
        self.z1 = name == "glmz1"
        self.compact = name not in ("glm4_5", "glmz1")  # GLM-4.7 onward: no newlines after role tokens, compact calls
        self.takes_tools = not self.z1
        if reasoning_history == "keep" and not self.compact:
            raise UserError(
                f"reasoning_history=keep renders earlier turns' reasoning, which only GLM-4.7's format has "
                f"(clear_thinking=false); with template={name} use expand (the default) or drop"
            )
        self.mask_history, self.train_on_prompt = mask_history, train_on_prompt
        self.nl = "" if self.compact else "\n"  # after a role token
        # How an empty thought is written: GLM-4.7/5.1 close one the prompt opened; GLM-5.2 writes it whole.
        self.empty_thought = "<think></think>" if name == "glm5_2" else "</think>"
        self.prefix = _ids(tokenizer, ["[gMASK]", "<sop>"])
        self.document_prefix = self.prefix
        roles = ("system", "user", "assistant", "observation")
        self.role_ids = dict(zip(roles, _ids(tokenizer, [f"<|{r}|>" for r in roles]), strict=True))

    # ---- text of each part -----------------------------------------------------------------------
    def _refuse_z1(self, conv: dict) -> None:
        if conv.get("tools") or any(m["role"] == "observation" or m.get("tool_call") for m in conv["messages"]):
            raise UserError(
                f"{conv.get('where', 'a conversation')}: template glmz1: GLM-Z1 publishes no tool-call format "
                "(its template lists tools but never renders a call); leave tool rows out or use glm4_0414"
            )
        if conv.get("enable_thinking") is False:
            raise UserError(
                f"{conv.get('where', 'a conversation')}: template glmz1 always thinks (GLM-Z1 was trained in the "
                "thinking state only); drop enable_thinking=false"
            )

    def _system_texts(self, conv: dict) -> list[str]:
        if self.z1:
            self._refuse_z1(conv)
            return ["\n" + conv.get("system", "")] if conv.get("system") or conv.get("system_turn") else []
        out = []
        if self.name == "glm5_2" and conv.get("enable_thinking") is not False:
            out.append(f"Reasoning Effort: {reasoning_effort(conv).capitalize()}")
        if conv.get("tools"):
            tools = [unwrap(t) for t in conv["tools"]] if self.name in ("glm5_1", "glm5_2") else conv["tools"]
            lines = "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tools)
            example = CALL_EXAMPLE["glm4_7" if self.compact else "glm4_5"]
            out.append("\n" + TOOLS_INTRO + lines + TOOLS_OUTRO + example)
        if conv.get("system") or conv.get("system_turn"):
            out.append(self.nl + conv.get("system", ""))
        return out

    def _user_text(self, content: str, conv: dict) -> str:
        if self.z1:
            return "\n" + content.split("</think>")[-1].strip()
        off = self.name == "glm4_5" and conv.get("enable_thinking") is False and not content.endswith("/nothink")
        return self.nl + content + ("/nothink" if off else "")

    def _call_text(self, call: dict) -> str:
        try:
            args = json.loads(call["arguments"]) if call["arguments"].strip() else {}
        except json.JSONDecodeError:
            args = None
        if not isinstance(args, dict):
            raise UserError(
                f"template={self.name}: the arguments of a call to {call['name']!r} are not a JSON object "
                f"({call['arguments'][:60]!r}); the GLM-4.5 formats write arguments key by key"
            )
        sep = self.nl
        parts = [f"{sep}<tool_call>{call['name']}{sep}"]
        for k, v in args.items():
            value = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
            parts.append(f"<arg_key>{k}</arg_key>{sep}<arg_value>{value}</arg_value>{sep}")
        return "".join(parts) + "</tool_call>"

    def _assistant_text(self, turn: list[dict], shows_reasoning: bool) -> tuple[str, bool]:
        """(text after <|assistant|>, whether the reasoning the turn had is shown)."""
        reasoning, answer = split_reasoning(turn[0])
        if self.z1:  # the model always thought; history shows none of it, so only the last turns are faithful
            if shows_reasoning:
                return (Z1_OPEN, f"\n{reasoning.strip()}\n</think>\n\n{answer.strip()}"), True
            return "\n" + answer.strip(), False
        shown = shows_reasoning and bool(reasoning)
        if not self.compact:
            text = f"\n<think>{reasoning.strip()}</think>" if shown else "\n<think></think>"
            text += f"\n{answer.strip()}" if answer.strip() else ""
        else:
            text = f"<think>{reasoning.strip()}</think>" if shown else self.empty_thought
            text += answer.strip()
        text += "".join(self._call_text(m["tool_call"]) for m in turn if m.get("tool_call"))
        return text, shown or not reasoning

    def expand(self, conv: dict) -> list[dict]:
        """The samples one conversation trains as (reasoning_history): `expand` adds, for each earlier round
        (a user turn and the replies up to the next user turn) with an assistant turn whose reasoning the
        format hides, the conversation cut after that round, training that round only: there it is the last
        round and its reasoning is shown. `keep` renders every turn's reasoning (GLM-4.7's clear_thinking
        false); `drop` leaves such turns untrained."""
        if self.reasoning_history == "keep":
            return [{**conv, "clear_thinking": False}]
        if self.reasoning_history == "drop" or not self.hidden_reasoning_turns(conv):
            return [conv]
        messages = conv["messages"]
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        extra = []
        for start, end in zip(users, users[1:], strict=False):
            round_conv = {**conv, "messages": messages[:end], "train_from": start}
            if any(start <= i < end for i in self._hidden(conv)):
                extra.append(round_conv)
        return extra + [conv]

    # ---- turns -----------------------------------------------------------------------------------
    def _turns(self, conv: dict) -> list[tuple[str, list[dict], int]]:
        """Messages grouped into turns (role, messages, index of the first): an assistant turn with all its
        calls, consecutive tool results."""
        turns: list[tuple[str, list[dict], int]] = []
        for i, m in enumerate(conv["messages"]):
            same = turns and (
                (m["role"] == "assistant" and m.get("same_turn") and turns[-1][0] == "assistant")
                or (m["role"] == "observation" and turns[-1][0] == "observation")
            )
            if same:
                turns[-1][1].append(m)
            else:
                turns.append((m["role"], [m], i))
        return turns

    def _pieces(self, conv: dict) -> list[tuple[str, str, bool, int]]:
        """(role, body text, trainable, first message index) per turn, the system turns included (index -1);
        trainable marks an assistant turn shown as the model saw it."""
        turns = self._turns(conv)
        last_user = max((i for i, (role, _, _) in enumerate(turns) if role == "user"), default=-1)
        keep_all = self.compact and conv.get("clear_thinking") is False
        out = [("system", text, False, -1) for text in self._system_texts(conv)]
        for i, (role, msgs, first) in enumerate(turns):
            if role == "user":
                out.append(("user", self._user_text(msgs[0]["content"], conv), False, first))
            elif role == "observation":
                sep = self.nl
                body = "".join(f"{sep}<tool_response>{sep}{m['content']}{sep}</tool_response>" for m in msgs)
                out.append(("observation", body, False, first))
            else:
                text, faithful = self._assistant_text(msgs, keep_all or i > last_user)
                out.append(("assistant", text, faithful, first))
        return out

    def _hidden(self, conv: dict) -> list[int]:
        """First message indices of the assistant turns whose reasoning the format hides."""
        return [first for role, _, faithful, first in self._pieces(conv) if role == "assistant" and not faithful]

    def generation_prompt(self, conv: dict) -> list[int]:
        off = conv.get("enable_thinking") is False
        if self.z1:
            tail = Z1_OPEN
        elif not self.compact:
            tail = "\n<think></think>" if off else ""
        else:
            tail = self.empty_thought if off else "<think>"
        return [self.role_ids["assistant"]] + _encode_text(self.tok, tail)

    def _body_ids(self, body) -> list[int]:
        """A turn's body: one text, or (GLM-Z1's reply) the generation prompt's tail and the reply, each
        encoded on its own, so the reply's ids are those a generation after that prompt would give."""
        if isinstance(body, tuple):
            return [i for piece in body for i in _encode_text(self.tok, piece)]
        return _encode_text(self.tok, body)

    def call_header_ids(self, name: str, conv: dict | None = None) -> list[int]:
        """What follows the generation prompt in a reply that must call tool `name`, up to its arguments: an
        empty thought (when the prompt did not close one already), then the call's opening."""
        off = (conv or {}).get("enable_thinking") is False
        if not self.compact:
            return _encode_text(self.tok, ("" if off else "\n<think></think>") + f"\n<tool_call>{name}")
        return _encode_text(self.tok, ("" if off else "</think>") + f"<tool_call>{name}")

    def encode_prompt(self, conv: dict) -> list[int]:
        ids = list(self.prefix)
        for role, body, _, _ in self._pieces(conv):
            ids += [self.role_ids[role]] + self._body_ids(body)
        return ids + self.generation_prompt(conv)

    def encode(self, conv: dict, cutoff_len: int) -> Encoded:
        pieces = self._pieces(conv)
        replies = [i for i, piece in enumerate(pieces) if piece[0] == "assistant"]
        head_end = next(i for i, piece in enumerate(pieces) if piece[0] != "system")
        train_from = conv.get("train_from", 0)  # an expanded round trains its own turns only (expand)
        head = list(self.prefix)
        for role, body, _, _ in pieces[:head_end]:
            head += [self.role_ids[role]] + self._body_ids(body)
        head_labels = list(head) if self.train_on_prompt else [IGNORE_INDEX] * len(head)
        head_labels[: len(self.prefix)] = [IGNORE_INDEX] * len(self.prefix)
        rounds, ids, labels, prev_trained = [], [], [], False
        for i in range(head_end, len(pieces)):
            role, body, faithful, first = pieces[i]
            header, body_ids = [self.role_ids[role]], self._body_ids(body)
            trained = role == "assistant" and faithful and first >= train_from
            trained = trained and (not self.mask_history or i == replies[-1])
            header_label = header if (prev_trained or self.train_on_prompt) else [IGNORE_INDEX]
            body_label = body_ids if (trained or self.train_on_prompt) else [IGNORE_INDEX] * len(body_ids)
            reply_start = len(ids) + 1
            ids, labels, prev_trained = ids + header + body_ids, labels + header_label + body_label, trained
            if role == "assistant":
                rounds.append((ids, labels, reply_start))
                ids, labels = [], []
        last_turn = self._turns(conv)[-1][1]
        end = self.role_ids["observation" if any(m.get("tool_call") for m in last_turn) else "user"]
        r_ids, r_labels, r_start = rounds[-1]
        rounds[-1] = (
            r_ids + [end],
            r_labels + [end if (prev_trained or self.train_on_prompt) else IGNORE_INDEX],
            r_start,
        )
        input_ids, out_labels, truncated, lost = _fit(head, head_labels, rounds, cutoff_len, header_len=1)
        last = max(i for i, m in enumerate(conv["messages"]) if m["role"] == "assistant" and not m.get("same_turn"))
        prompt = self.encode_prompt({**conv, "messages": conv["messages"][:last]})
        reasoning, answer = split_reasoning(conv["messages"][last])
        calls = [m["tool_call"] for m in conv["messages"][last:] if m.get("tool_call")]
        reference = answer.strip() or "".join(self._call_text(c) for c in calls).strip()
        return Encoded(input_ids, out_labels, prompt, reference, truncated, lost)

    def hidden_reasoning_turns(self, conv: dict) -> int:
        """Assistant turns whose reasoning the format hides (not trained in this conversation)."""
        return len(self._hidden(conv))
