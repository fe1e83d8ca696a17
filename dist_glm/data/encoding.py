"""What every chat template shares: the encoded sample, special-token lookup, and fitting a conversation's
rounds into cutoff_len (dist_glm.data.template and dist_glm.data.thinking build on these)."""

from dataclasses import dataclass

from dist_glm.errors import UserError

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int]  # everything before the last reply, for generation
    reference: str  # the last reply's text, for generation metrics
    truncated: bool
    # What cutoff_len cost, when truncated: "rounds" (earlier rounds dropped), "question" (the end of the
    # prompt, i.e. the last user turn, cut), "reply" (the trained reply cut short).
    lost: tuple[str, ...] = ()


def _encode_text(tokenizer, s: str) -> list[int]:
    return tokenizer.encode(s, add_special_tokens=False) if s else []


def _ids(tokenizer, names: list[str]) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(names)
    missing = [n for n, i in zip(names, ids, strict=True) if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise UserError(
            f"template: this tokenizer lacks the special tokens {missing} that the chosen chat template needs (is it "
            "the template of another model?); set template=auto to use the model's own"
        )
    return ids


def _fit(
    head, head_labels, rounds, cutoff_len: int, header_len: int
) -> tuple[list[int], list[int], bool, tuple[str, ...]]:
    """Join head + rounds [(ids, labels, reply_start)] within cutoff_len: drop the oldest rounds first,
    then split the last round between prompt and reply so the reply keeps at least half the budget.
    The prompt is cut from its end but keeps its last `header_len` tokens (the assistant header).
    Also returns what was lost (Encoded.lost)."""
    truncated = len(head) + sum(len(r[0]) for r in rounds) > cutoff_len
    lost = ("rounds",) if len(rounds) > 1 and truncated else ()
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
        return ids + last_ids, labels + last_labels, truncated, lost
    prompt_ids, prompt_labels = ids + last_ids[:start], labels + last_labels[:start]
    reply_ids, reply_labels = last_ids[start:], last_labels[start:]
    reply_budget = min(len(reply_ids), max(cutoff_len // 2, cutoff_len - len(prompt_ids)))
    keep = max(cutoff_len - reply_budget - header_len, 0)
    cut_ids = prompt_ids[:keep] + prompt_ids[-header_len:]
    cut_labels = prompt_labels[:keep] + prompt_labels[-header_len:]
    lost = (
        lost
        + (("question",) if keep < len(prompt_ids) - header_len else ())
        + (("reply",) if reply_budget < len(reply_ids) else ())
    )
    return cut_ids + reply_ids[:reply_budget], cut_labels + reply_labels[:reply_budget], True, lost
