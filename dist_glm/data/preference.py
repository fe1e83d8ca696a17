"""Preference data: pairs for `stage: dpo`, answers labelled desirable or not for `stage: kto`. Every answer is
rendered by the chat template exactly as an SFT row ending with it would be, so it is the text the model would
write, and only that last answer is labelled (no earlier turn, no prompt): its log-probability is its own.

Pair formats (the first row of each file decides, as for SFT):
- LLaMA-Factory's ranking datasets (`"ranking": true` in dataset_info.json): sharegpt `conversations` (the
  prompt turns) with `chosen` / `rejected` turns (`{"from": "gpt", "value": ...}`), or alpaca columns with
  `chosen` / `rejected` strings;
- TRL's `prompt` / `chosen` / `rejected`: strings (the prompt becomes a user turn, rendered by the chat
  template), or message lists (the prompt's turns; the answers' assistant turns, with `reasoning_content` or
  tool calls where the template has them), or `chosen` / `rejected` alone as whole conversations sharing
  everything before the answer (TRL's implicit prompt);
- OpenAI `messages` ending with the chosen assistant turn, plus a `rejected` assistant message.

A pair whose answers render to the same tokens, or whose answer is empty, teaches nothing: a `file:line` error
(or skipped with `on_invalid: skip`, listed with the reason). Both answers always follow the same prompt
tokens: a pair too long for `cutoff_len` has its prompt cut once (as the template cuts it for the longer
answer) and both answers cut to the room left; such pairs are counted in the log.

KTO rows (`feedback_row`): LLaMA-Factory's `kto_tag` column, TRL's unpaired `prompt` / `completion` / `label`,
or any SFT conversation with a boolean `label`. Each gets a KL row (`load_feedback`).
"""

import json
from dataclasses import dataclass

from dist_glm.data.batching import Example
from dist_glm.data.converters import (
    CONVERTERS,
    as_object,
    bad_rows_error,
    check_alternation,
    check_text,
    detect_format,
    remap,
)
from dist_glm.data.encoding import IGNORE_INDEX
from dist_glm.data.sources import BadRow, read_rows, split_paths
from dist_glm.errors import UserError


@dataclass(frozen=True)
class Pair:
    chosen: Example
    rejected: Example

    @property
    def rows(self) -> tuple[Example, Example]:
        """The rows the pair puts into a batch (the padding count reads them)."""
        return self.chosen, self.rejected

    @property
    def input_ids(self) -> list[int]:
        """Both rows' tokens: what length grouping sorts by, and what a held-out split tells pairs apart by."""
        return self.chosen.input_ids + self.rejected.input_ids

    position_ids = None  # pairs are never packed

    def masked(self) -> "Pair":
        return Pair(self.chosen.masked(), self.rejected.masked())


@dataclass(frozen=True)
class Feedback:
    """stage=kto: one answer labelled desirable or not, and its KL row (the same prompt followed by another
    sample's answer), from which the step estimates KTO's reference point."""

    completion: Example
    kl: Example
    desirable: bool

    @property
    def rows(self) -> tuple[Example, Example]:
        return self.completion, self.kl

    @property
    def input_ids(self) -> list[int]:
        return self.completion.input_ids

    position_ids = None  # never packed

    def masked(self) -> "Feedback":
        return Feedback(self.completion.masked(), self.kl.masked(), self.desirable)


def as_rows(samples: list) -> list:
    """Samples as the rows a batch holds: a pair's chosen row, then its rejected one."""
    return [row for s in samples for row in getattr(s, "rows", (s,))]


def _answer_turn(value, where: str) -> dict:
    """A chosen/rejected answer as one assistant turn in the row's own shape."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value = value[0]  # TRL's conversational answers: a list holding the assistant message
    if not isinstance(value, str | dict):
        raise BadRow(f"field '{where}' must be the answer: its text, or an assistant message")
    return value


def rows_of(row: dict, mapping: dict | None) -> tuple[str, dict, dict]:
    """(format, the row ending with the chosen answer, the row ending with the rejected one)."""
    cols = (mapping or {}).get("columns", {})
    chosen_key, rejected_key = cols.get("chosen", "chosen"), cols.get("rejected", "rejected")
    if (mapping is not None and mapping["formatting"] == "sharegpt") or "conversations" in row:
        key = cols.get("messages", "conversations")
        prompt = row.get(key)
        if not isinstance(prompt, list):
            raise BadRow(f"field '{key}' must be the list of prompt turns")
        tags = (mapping or {}).get("tags", {})
        role, content = tags.get("role_tag", "from"), tags.get("content_tag", "value")

        def turn(value, name):
            if isinstance(value, str):
                value = {role: tags.get("assistant_tag", "gpt"), content: value}
            if not isinstance(value, dict):
                raise BadRow(f"field '{name}' must be an answer turn ({{'{role}': 'gpt', '{content}': ...}})")
            return value

        base = {k: v for k, v in row.items() if k not in (chosen_key, rejected_key)}
        if mapping is not None:
            out = []
            for name in (chosen_key, rejected_key):
                full = dict(base, **{key: prompt + [turn(_answer_turn(row.get(name), name), name)]})
                out.append(remap(full, {**mapping, "formatting": "sharegpt"}))
            return "sharegpt", out[0], out[1]
        rows = [
            dict(base, conversations=prompt + [turn(_answer_turn(row.get(n), n), n)]) for n in ("chosen", "rejected")
        ]
        return detect_format(rows[0], "") or "sharegpt", rows[0], rows[1]
    if "messages" in row:  # OpenAI messages ending with the chosen turn, plus `rejected`
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise BadRow("field 'messages' must be a non-empty list ending with the chosen answer")
        rejected = _answer_turn(row.get("rejected"), "rejected")
        if isinstance(rejected, str):
            rejected = {"role": "assistant", "content": rejected}
        base = {k: v for k, v in row.items() if k != "rejected"}
        return "openai", base, dict(base, messages=messages[:-1] + [rejected])
    if "prompt" not in row and all(isinstance(row.get(k), list) and len(row[k]) > 1 for k in ("chosen", "rejected")):
        # TRL's implicit prompt: two whole conversations that share everything before the answer
        extra = {"tools": row["tools"]} if "tools" in row else {}
        return "openai", {"messages": row["chosen"], **extra}, {"messages": row["rejected"], **extra}
    if "prompt" in row and isinstance(row["prompt"], list):  # TRL's conversational form
        out = []
        for name in ("chosen", "rejected"):
            answer = _answer_turn(row.get(name), name)
            if isinstance(answer, str):
                answer = {"role": "assistant", "content": answer}
            out.append({"messages": row["prompt"] + [answer], **({"tools": row["tools"]} if "tools" in row else {})})
        return "openai", out[0], out[1]
    # alpaca columns (LLaMA-Factory's ranking alpaca, or TRL's plain `prompt` string)
    prompt_key = cols.get("prompt", "prompt" if "prompt" in row else "instruction")
    base = {
        "instruction": row.get(prompt_key),
        "input": row.get(cols.get("query", "input")) or "",
        "system": row.get(cols.get("system", "system")) or "",
        "history": row.get(cols.get("history", "history")) or [],
    }
    if base["instruction"] is None:
        raise BadRow(f"missing field '{prompt_key}' (the prompt)")
    rows = []
    for name in (chosen_key, rejected_key):
        answer = _answer_turn(row.get(name), name)
        if not isinstance(answer, str):
            raise BadRow(f"field '{name}' must be the answer's text here")
        rows.append(dict(base, output=answer))
    return "alpaca", rows[0], rows[1]


def _conversation(fmt: str, row: dict, data_cfg) -> dict:
    conv = CONVERTERS[fmt](row, data_cfg)
    check_alternation(conv["messages"])
    check_text(conv)
    return conv


def _check_answer(conv: dict, mapping: dict | None, where: str, name: str) -> None:
    last = conv["messages"][-1]
    if not last.get("tool_call") and not (last["content"] or "").strip():
        raise BadRow(f"{name} is empty; there is nothing to prefer or not")
    conv["where"] = where
    if "enable_thinking" not in conv and (mapping or {}).get("enable_thinking") is not None:
        conv["enable_thinking"] = mapping["enable_thinking"]


def _answer_start(labels: list[int]) -> int:
    return next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)


def encode_pair(template, convs: list[dict], cutoff_len: int) -> tuple[Pair, bool]:
    """Both answers after one prompt, token for token: when the longer answer does not fit, the prompt is cut
    once, as the template cuts it for that answer (oldest rounds first, the assistant header kept), and both
    answers are cut to the room left after it. Returns (the pair, whether anything was cut)."""
    full = [template.encode(conv, 10**9) for conv in convs]
    starts = [_answer_start(e.labels) for e in full]
    prompt = full[0].input_ids[: starts[0]]
    if prompt != full[1].input_ids[: starts[1]]:
        raise BadRow(
            "the chosen and rejected answers follow different prompts once rendered; a pair answers one prompt"
        )
    answers = [e.input_ids[s:] for e, s in zip(full, starts, strict=True)]
    if answers[0] == answers[1]:
        raise BadRow("the chosen and rejected answers render to the same tokens; a pair teaches nothing then")
    cut = len(prompt) + max(map(len, answers)) > cutoff_len
    if cut:  # the template's own cut of the prompt, for the longer answer
        longer = template.encode(convs[int(len(answers[1]) > len(answers[0]))], cutoff_len)
        prompt = longer.input_ids[: _answer_start(longer.labels)]
    room = cutoff_len - len(prompt)
    rows = [
        Example(prompt + a[:room], [IGNORE_INDEX] * len(prompt) + a[:room], e.prompt_ids, e.reference)
        for a, e in zip(answers, full, strict=True)
    ]
    return Pair(*rows), cut


def load_pairs(spec: str, tokenizer, data_cfg, template_name: str, skipped: list[dict], max_samples: int = 0):
    """Every pair of the comma-separated files in `spec`: (pairs, counts for the log)."""
    from dist_glm.data.batching import check_reasoning_is_rendered
    from dist_glm.data.template import build_template

    # Only the answer is trained (its log-probability is what is compared): no earlier turn, no prompt.
    template = build_template(template_name, tokenizer, mask_history=True, train_on_prompt=False)

    def not_pairs(mapping):
        if mapping is not None and not mapping.get("ranking"):
            return ('its dataset_info.json entry is not a ranking dataset ("ranking": true, with chosen and rejected '
                    "columns); stage=dpo trains preference pairs")  # fmt: skip
        return None

    def pair_of(row, mapping, where):
        fmt, chosen_row, rejected_row = rows_of(row, mapping)
        convs = [_conversation(fmt, r, data_cfg) for r in (chosen_row, rejected_row)]
        if convs[0]["messages"][:-1] != convs[1]["messages"][:-1] or convs[0]["system"] != convs[1]["system"]:
            raise BadRow("the chosen and rejected rows have different prompts; a pair answers one prompt")
        if any(c["messages"][-1]["role"] != "assistant" for c in convs):
            raise BadRow("each answer must be an assistant turn after the prompt")
        for name, conv in zip(("chosen", "rejected"), convs, strict=True):
            _check_answer(conv, mapping, where, f"the {name} answer")
        check_reasoning_is_rendered(convs, template_name)  # as SFT: reasoning the template drops is refused
        return encode_pair(template, convs, data_cfg.cutoff_len)

    built = _build_each(spec, data_cfg, max_samples, skipped, "pairs", not_pairs, pair_of)
    return [pair for pair, _ in built], {"truncated": sum(cut for _, cut in built)}


def _build_each(spec: str, data_cfg, max_samples: int, skipped: list[dict], what: str, refusal, build) -> list:
    """`build(row, mapping, where)` on every row of the comma-separated files in `spec` (at most `max_samples` a
    file), in order; `refusal(mapping)` says why a file's registry entry is not for this stage. A row that
    raises BadRow is a file:line error, or skipped with the reason under `on_invalid: skip`."""
    registered = json.loads(getattr(data_cfg, "dataset_columns", "") or "{}")
    out, bad = [], []
    for path in split_paths(spec):
        mapping = registered.get(path)
        problem = refusal(mapping)
        if problem:
            raise UserError(f"{path}: {problem}")
        taken = 0
        for lineno, row in read_rows(path):
            if max_samples and taken >= max_samples:
                break
            where = f"{path}:{lineno}"
            try:
                out.append(build(as_object(row), mapping, where))
            except BadRow as e:
                if data_cfg.on_invalid == "skip":
                    skipped.append({"where": where, "error": str(e)})
                else:
                    bad.append(f"{where}: {e}")
                continue
            taken += 1
    if bad:
        raise bad_rows_error(bad, what)
    return out


def feedback_row(row: dict, mapping: dict | None) -> tuple[str, dict, bool]:
    """(format, the row ending with the answer, whether the answer is desirable) of one KTO row: LLaMA-Factory's
    `kto_tag` column (sharegpt or alpaca), TRL's unpaired `prompt` / `completion` / `label` (strings or message
    lists), or any SFT row (OpenAI messages, sharegpt, alpaca) with a `label`."""
    tag = (mapping or {}).get("columns", {}).get("kto_tag", "label")
    label = row.get(tag)
    if not isinstance(label, bool):
        where = f"column '{tag}' (columns.kto_tag in dataset_info.json)" if mapping else f"field '{tag}'"
        raise BadRow(f"{where} must be true (a desirable answer) or false (an undesirable one), got {label!r}")
    rest = {k: v for k, v in row.items() if k != tag}
    if mapping is not None:
        return mapping["formatting"], remap(rest, mapping), label
    if "prompt" in rest and "completion" in rest:  # TRL's unpaired preference rows
        prompt, answer = rest["prompt"], _answer_turn(rest["completion"], "completion")
        if isinstance(prompt, list):
            answer = answer if isinstance(answer, dict) else {"role": "assistant", "content": answer}
            return (
                "openai",
                {"messages": prompt + [answer], **({"tools": rest["tools"]} if "tools" in rest else {})},
                label,
            )
        if not isinstance(answer, str):
            raise BadRow("field 'completion' must be the answer's text when the prompt is a string")
        return "alpaca", {"instruction": prompt, "input": "", "output": answer}, label
    fmt = detect_format(rest, "")
    if fmt is None or fmt in ("text", "advertisegen"):
        raise BadRow("a KTO row is a conversation ending with the answer (messages, conversations, or "
                     "instruction/output, or TRL's prompt/completion) plus a true/false label")  # fmt: skip
    return fmt, rest, label


def load_feedback(spec: str, tokenizer, data_cfg, template_name: str, skipped: list[dict], max_samples: int = 0):
    """stage=kto: every labelled answer of the comma-separated files in `spec`, each with its KL row (its prompt
    followed by the answer of the next sample, in file order, that has another prompt; fixed before any batching
    so that the estimate does not depend on how a step is split). Returns (samples, counts for the log)."""
    from dist_glm.data.batching import check_reasoning_is_rendered
    from dist_glm.data.template import build_template

    template = build_template(template_name, tokenizer, mask_history=True, train_on_prompt=False)

    def not_labelled(mapping):
        if mapping is not None and "kto_tag" not in mapping.get("columns", {}):
            return ("its dataset_info.json entry has no kto_tag column (the desirable / undesirable label); "
                    "stage=kto trains labelled answers")  # fmt: skip
        return None

    def answer_of(row, mapping, where):
        fmt, conv_row, desirable = feedback_row(row, mapping)
        conv = _conversation(fmt, conv_row, data_cfg)
        if conv["messages"][-1]["role"] != "assistant":
            raise BadRow("the answer must be an assistant turn after the prompt")
        _check_answer(conv, mapping, where, "the answer")
        check_reasoning_is_rendered([conv], template_name)
        enc = template.encode(conv, data_cfg.cutoff_len)
        if all(label == IGNORE_INDEX for label in enc.labels):
            raise BadRow("no answer token fits in cutoff_len")
        return enc, _answer_start(enc.labels), desirable

    encoded = _build_each(spec, data_cfg, max_samples, skipped, "rows", not_labelled, answer_of)
    samples = []
    prompts = [enc.input_ids[:start] for enc, start, _ in encoded]
    for i, (enc, _, desirable) in enumerate(encoded):
        # The next sample that answers another prompt: data written as prompt, chosen, prompt, rejected would
        # otherwise pair an answer with its own prompt, which is no mismatch.
        j = next((k % len(encoded) for k in range(i + 1, i + len(encoded)) if prompts[k % len(encoded)] != prompts[i]),
                 (i + 1) % len(encoded))  # fmt: skip
        other, other_start, _ = encoded[j]
        prompt, answer = prompts[i], other.input_ids[other_start:]
        room = data_cfg.cutoff_len - len(prompt)
        completion = Example(enc.input_ids, enc.labels, enc.prompt_ids, enc.reference)
        kl = Example(prompt + answer[:room], [IGNORE_INDEX] * len(prompt) + answer[:room], [], "")
        samples.append(Feedback(completion, kl, desirable))
    return samples, {"desirable": sum(s.desirable for s in samples)}
