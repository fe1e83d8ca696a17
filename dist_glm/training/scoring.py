"""The Chinese generation metrics the ChatGLM scripts report: ROUGE-1/2/L on jieba words and BLEU-4 on
characters, for evaluation with generation."""

import math
from collections import Counter


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _f1(overlap: int, hyp_total: int, ref_total: int) -> float:
    if overlap == 0:
        return 0.0
    p, r = overlap / hyp_total, overlap / ref_total
    return 2 * p * r / (p + r)


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_scores(hyp: list[str], ref: list[str]) -> dict[str, float]:
    """ROUGE-1/2 (F1 of the *sets* of n-grams) and ROUGE-L (LCS F1) of one hypothesis against one
    reference: what `rouge_chinese` (the scorer of the ChatGLM fine-tuning scripts) computes, so our
    numbers are comparable with theirs; a repeated word counts once."""
    out = {}
    for n in (1, 2):
        h, r = set(_ngrams(hyp, n)), set(_ngrams(ref, n))
        out[f"rouge-{n}"] = _f1(len(h & r), len(h), len(r))
    out["rouge-l"] = _f1(_lcs(hyp, ref), len(hyp), len(ref)) if hyp and ref else 0.0
    return out


def bleu4(hyp: list[str], ref: list[str]) -> float:
    """Sentence BLEU-4 with NLTK's smoothing method 3 (NIST geometric), as the ChatGLM scripts use."""
    if not hyp or not (_ngrams(hyp, 1) & _ngrams(ref, 1)):
        return 0.0  # NLTK's convention: no shared character at all scores 0, not a smoothed value
    log_p, k = 0.0, 1
    for n in range(1, 5):
        h, r = _ngrams(hyp, n), _ngrams(ref, n)
        total = max(sum(h.values()), 1)
        hits = sum((h & r).values())
        if hits == 0:
            k *= 2
            log_p += math.log(1 / (k * total))
        else:
            log_p += math.log(hits / total)
    bp = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return bp * math.exp(log_p / 4)


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L (jieba words), BLEU-4 (characters) and exact match, all in percent."""
    import jieba

    jieba.setLogLevel(60)  # silence its dictionary-loading chatter
    sums = Counter()
    for pred, ref in zip(predictions, references, strict=True):
        # As the ChatGLM scripts: jieba words joined by spaces and split again, so whitespace is no word.
        hyp_words, ref_words = " ".join(jieba.cut(pred)).split(), " ".join(jieba.cut(ref)).split()
        sums.update(rouge_scores(hyp_words, ref_words))
        sums["bleu-4"] += bleu4(list(pred), list(ref))
        sums["exact_match"] += float(pred.strip() == ref.strip())
    n = max(len(predictions), 1)
    return {k: 100 * v / n for k, v in sums.items()}
