"""Generation metrics on hand-checked strings; the loss helper's token accounting."""

import math

import pytest
import torch

from dist_glm.objectives.cross_entropy import count_trainable_tokens, plain_token_loss_sum
from dist_glm.training.scoring import bleu4, generation_metrics, rouge_scores


def test_rouge_hand_checked():
    # unigrams: 2 shared of 4 (hyp) and 3 (ref): F1 = 2 * 0.5 * 0.667 / 1.167 = 0.5714
    # bigrams: {ab} shared of 3 and 2: F1 = 2 * (1/3) * (1/2) / (5/6) = 0.4; LCS "ab" = 2 -> 0.5714
    s = rouge_scores(list("abcd"), list("abe"))
    assert s["rouge-1"] == pytest.approx(4 / 7)
    assert s["rouge-2"] == pytest.approx(0.4)
    assert s["rouge-l"] == pytest.approx(4 / 7)
    assert rouge_scores([], list("abc"))["rouge-l"] == 0.0


def test_bleu4_matches_nltk_method3_values():
    # Reference values from nltk.translate.bleu_score.sentence_bleu(..., SmoothingFunction().method3).
    assert bleu4(list("这款红色裙子很好看"), list("这款蓝色裙子很好看")) == pytest.approx(0.6606328636027614)
    assert bleu4(list("红"), list("这款红色连衣裙")) == pytest.approx(0.0008763712365008487)
    assert bleu4(list("完全不同"), list("这款红色")) == 0.0
    assert bleu4(list("这款红色"), list("这款红色")) == pytest.approx(1.0)


def test_generation_metrics_are_percentages():
    m = generation_metrics(["这款红色连衣裙", "完全不同"], ["这款红色连衣裙", "这款蓝色上衣"])
    assert m["exact_match"] == 50.0
    assert m["rouge-l"] == pytest.approx(50.0)  # 100 for the first, 0 for the second
    assert 50.0 <= m["bleu-4"] <= 50.01


def test_token_loss_sum_counts_only_labelled_positions():
    logits = torch.zeros(1, 4, 5)  # uniform: every token costs ln 5
    labels = torch.tensor([[-100, -100, 2, 3]])
    loss_sum, n = plain_token_loss_sum(logits, labels), count_trainable_tokens(labels)
    assert n == 2 and float(loss_sum) == pytest.approx(2 * math.log(5))


def test_rouge_on_jieba_words_bleu_on_characters_and_exact_match():
    # jieba: 这/款/连衣裙/很/好看 vs 这/款/连衣裙/不/好看. Words: 4 of 5 shared, LCS 4 -> ROUGE-1 = ROUGE-L = 80;
    # bigrams: 2 of 4 shared -> ROUGE-2 = 50. rouge_chinese (what the ChatGLM scripts call) gives the same.
    # BLEU-4 on characters: nltk sentence_bleu(..., SmoothingFunction().method3) = 0.5946035575013605.
    m = generation_metrics(["这款连衣裙很好看"], ["这款连衣裙不好看"])
    assert m["rouge-1"] == pytest.approx(80.0)
    assert m["rouge-2"] == pytest.approx(50.0)
    assert m["rouge-l"] == pytest.approx(80.0)
    assert m["bleu-4"] == pytest.approx(59.46035575013605)
    assert m["exact_match"] == 0.0
    # Exact match ignores leading and trailing whitespace only.
    assert generation_metrics([" 这款连衣裙\n"], ["这款连衣裙"])["exact_match"] == 100.0
    assert generation_metrics(["这款 连衣裙"], ["这款连衣裙"])["exact_match"] == 0.0


def test_rouge_matches_chatglm_scorer_on_repeats_and_spaces():
    # Reference: rouge_chinese.Rouge().get_scores(" ".join(jieba.cut(p)), " ".join(jieba.cut(r)))[0][k]["f"],
    # as in ChatGLM3's finetune_demo: (100, 0, 50) and (100, 100, 100); BLEU-4 from nltk method3.
    m = generation_metrics(["好看好看好看", "这款红色外套采用棉质面料 "], ["好看", "这款红色外套采用棉质面料"])
    assert m["bleu-4"] == pytest.approx((16.233395773754943 + 91.2167909070388) / 2)
    assert m["rouge-1"] == pytest.approx(100.0, abs=1e-4)
    assert m["rouge-2"] == pytest.approx(50.0, abs=1e-4)
    assert m["rouge-l"] == pytest.approx(75.0, abs=1e-4)


def test_progress_in_a_log_file_is_a_plain_line_every_n_steps(capsys):
    """Not a terminal (a Slurm log, a pipe): no tqdm `\\r` bar, one readable line per `every` steps."""
    from dist_glm.training.telemetry import Progress

    bar = Progress(total=7, initial=2, enabled=True, every=2)
    for step, loss in zip(range(3, 8), (1.0, 2.0, 3.0, 9.0, 5.0), strict=True):
        bar.update(loss=loss, lr=1e-3, counted=step != 5)  # step 5's update was skipped
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in lines] == ["4/7", "6/7", "7/7"]
    # The mean over the logging window, as metrics.jsonl records it (steps 3-4, then 6 alone, then 7).
    assert [float(line.split("loss ")[1].split()[0]) for line in lines] == [1.5, 9.0, 5.0]
    assert lines[-1].startswith("[dist_glm] step 7/7 (100%) loss 5.0000 (mean of 1 steps, as logged) lr 1.00e-03")
    assert "s/step (average)" in lines[-1] and "eta 0:00:00" in lines[-1]
    silent = Progress(total=3, initial=0, enabled=False, every=1)
    silent.update(loss=1.0, lr=1e-3)
    assert capsys.readouterr().out == ""
