"""Preference training (stage=dpo): each loss against a float64 reference written from its paper, the
per-row log-probabilities against the full-logits computation, the pair formats users have with their bad
pairs, and real processes: the same global batch gives the same losses on 1 and 2 ranks (ZeRO-3) and with
accumulation, with the adapter-off reference (LoRA) and with a frozen reference copy (full)."""

import json
import math
import re

import pytest
import torch

from conftest import REPO, TINY_MODEL, base_args, read_metrics, run_script, run_train
from dist_glm.config import PreferenceConfig, load_config
from dist_glm.data.preference import load_pairs
from dist_glm.errors import UserError
from dist_glm.models.loading import load_tokenizer
from dist_glm.objectives.preference import Preference, pair_losses, row_logps


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def reference_loss(kind, pc, pr, rc, rr, lc, lr, beta, gamma) -> float:
    """One pair's loss in float64 Python arithmetic, from each paper's definition."""
    if kind in ("ipo", "orpo", "simpo"):  # on the mean log-probability per token (IPO: as TRL computes it)
        pc, pr, rc, rr = pc / lc, pr / lr, rc / lc, rr / lr
    h = (pc - rc) - (pr - rr)
    if kind == "sigmoid":  # DPO, Rafailov et al. 2023, eq. 7
        return -log_sigmoid(beta * h)
    if kind == "hinge":  # SLiC-HF hinge on the DPO margin
        return max(0.0, 1 - beta * h)
    if kind == "ipo":  # Azar et al. 2023, eq. 17 (the paper on sequence log-likelihoods)
        return (h - 1 / (2 * beta)) ** 2
    if kind == "orpo":  # Hong et al. 2024: L_SFT + lambda * L_OR, odds = p / (1 - p)
        log_odds = (pc - math.log1p(-math.exp(pc))) - (pr - math.log1p(-math.exp(pr)))
        return -pc - beta * log_sigmoid(log_odds)
    return -log_sigmoid(beta * (pc - pr) - gamma)  # SimPO, Meng et al. 2024, eq. 6


@pytest.mark.parametrize("kind", ["sigmoid", "hinge", "ipo", "orpo", "simpo"])
def test_each_loss_equals_its_float64_reference(kind):
    g = torch.Generator().manual_seed(3)
    lc, lr = torch.randint(1, 30, (6,), generator=g).double(), torch.randint(1, 30, (6,), generator=g).double()
    pc, pr = (
        -torch.rand(6, generator=g, dtype=torch.float64) * lc,
        -torch.rand(6, generator=g, dtype=torch.float64) * lr,
    )
    rc, rr = (
        pc - torch.randn(6, generator=g, dtype=torch.float64),
        pr - torch.randn(6, generator=g, dtype=torch.float64),
    )
    beta, gamma = 0.3, 0.5
    ref = None if kind in ("orpo", "simpo") else (rc, rr)
    losses, chosen, rejected = pair_losses((pc, pr), ref, (lc, lr), kind, beta, gamma)
    want = [reference_loss(kind, *(float(t[i]) for t in (pc, pr, rc, rr, lc, lr)), beta, gamma) for i in range(6)]
    assert losses.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
    if ref is not None:  # DPO's implicit rewards: beta * log(pi / pi_ref) of each answer
        scale = (lc, lr) if kind == "ipo" else (1, 1)
        assert chosen.tolist() == pytest.approx((beta * (pc - rc) / scale[0]).tolist(), rel=1e-12)
        assert rejected.tolist() == pytest.approx((beta * (pr - rr) / scale[1]).tolist(), rel=1e-12)


def test_row_log_probabilities_equal_the_full_logits_computation():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_MODEL)).double()
    ids = torch.randint(10, 700, (3, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 9:] = -100
    labels[2, :] = -100  # a row with nothing labelled sums to 0
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    got = row_logps(model, batch)
    logp = model(input_ids=ids).logits[:, :-1].log_softmax(-1)
    targets = labels[:, 1:]
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (targets != -100)
    torch.testing.assert_close(got.double(), picked.sum(-1), rtol=1e-5, atol=1e-5)  # fp32 sums, as in training


def write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def pairs_from(path, **data):
    cfg = load_config(["--model_name_or_path=m", f"--dataset={path}", "--output_dir=o", "--stage=dpo"], None)
    for k, v in data.items():
        setattr(cfg.data, k, v)
    skipped = []
    pairs, _ = load_pairs(cfg.data.dataset, load_tokenizer(str(TINY_MODEL)), cfg.data, "glm4", skipped)
    return pairs, skipped


def test_every_pair_format_renders_both_answers_after_one_prompt(tmp_path):
    tok = load_tokenizer(str(TINY_MODEL))
    trl = write(tmp_path / "trl.jsonl", [{"prompt": "类型#裙", "chosen": "红色", "rejected": "蓝色"}])
    trl_chat = write(tmp_path / "trl_chat.jsonl", [{
        "prompt": [{"role": "user", "content": "类型#裙"}],
        "chosen": [{"role": "assistant", "content": "红色"}], "rejected": [{"role": "assistant", "content": "蓝色"}],
    }])  # fmt: skip
    openai = write(tmp_path / "openai.jsonl", [{
        "messages": [{"role": "user", "content": "类型#裙"}, {"role": "assistant", "content": "红色"}],
        "rejected": {"role": "assistant", "content": "蓝色"},
    }])  # fmt: skip
    sharegpt = write(tmp_path / "lf.json", [])
    sharegpt.write_text(json.dumps([{
        "conversations": [{"from": "human", "value": "类型#裙"}],
        "chosen": {"from": "gpt", "value": "红色"}, "rejected": {"from": "gpt", "value": "蓝色"},
    }], ensure_ascii=False))  # fmt: skip
    implicit = write(tmp_path / "trl_implicit.jsonl", [{
        "chosen": [{"role": "user", "content": "类型#裙"}, {"role": "assistant", "content": "红色"}],
        "rejected": [{"role": "user", "content": "类型#裙"}, {"role": "assistant", "content": "蓝色"}],
    }])  # fmt: skip
    texts = set()
    for path in (trl, trl_chat, implicit, openai, sharegpt):
        (pair,), _ = pairs_from(path)
        chosen, rejected = tok.decode(pair.chosen.input_ids), tok.decode(pair.rejected.input_ids)
        texts.add((chosen, rejected))
        prompt = len(pair.chosen.prompt_ids)
        assert pair.chosen.input_ids[:prompt] == pair.rejected.input_ids[:prompt] == pair.chosen.prompt_ids
        assert all(x == -100 for x in pair.chosen.labels[:prompt]) and pair.chosen.labels[prompt:][-1] != -100
    assert texts == {("[gMASK]<sop><|user|>\n类型#裙<|assistant|>\n红色<|user|>",
                      "[gMASK]<sop><|user|>\n类型#裙<|assistant|>\n蓝色<|user|>")}  # fmt: skip


def test_llamafactory_ranking_entries_train_with_stage_dpo_only(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "你好"}], "chosen": {"from": "gpt", "value": "你好！"},
             "rejected": {"from": "gpt", "value": "走开"}}]  # fmt: skip
    (tmp_path / "dpo_zh_demo.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    info = {
        "dpo_zh_demo": {
            "file_name": "dpo_zh_demo.json",
            "ranking": True,
            "formatting": "sharegpt",
            "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
        }
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    common = ["--model_name_or_path=m", "--dataset=dpo_zh_demo", f"--dataset_dir={tmp_path}", "--output_dir=o"]
    cfg = load_config([*common, "--stage=dpo"], None)
    from dist_glm.data.registry import resolve

    assert resolve(cfg.data) == []
    pairs, _ = load_pairs(cfg.data.dataset, load_tokenizer(str(TINY_MODEL)), cfg.data, "glm4", [])
    assert len(pairs) == 1
    from dist_glm.data.converters import load_conversations

    sft = load_config(common, None)
    assert resolve(sft.data) == []
    with pytest.raises(UserError, match="ranking .preference. dataset in dataset_info.json; train it with stage: dpo"):
        load_conversations(sft.data.dataset, sft.data, [])


@pytest.mark.parametrize(
    "row, error",
    [
        ({"prompt": "q", "chosen": "a", "rejected": "a"}, "the chosen and rejected answers render to the same tokens"),
        (  # different only in a thought the glm4 template does not write: refused as in SFT, not trained as a no-op
            {
                "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "rejected": {"role": "assistant", "content": "a", "reasoning_content": "hmm"},
            },
            "reasoning_content",
        ),
        ({"prompt": "q", "chosen": "a", "rejected": ""}, "empty"),
        ({"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": 5}, "rejected"),
        ({"chosen": "a", "rejected": "b"}, "missing field 'instruction'"),
    ],
)
def test_a_bad_pair_names_its_line_or_is_skipped_with_the_reason(tmp_path, row, error):
    path = write(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(UserError, match=f"{path}:2: .*{error}"):
        pairs_from(path)
    if error == "reasoning_content":  # a setting of the whole run, as in SFT: never skipped row by row
        return
    pairs, skipped = pairs_from(path, on_invalid="skip")
    assert len(pairs) == 1 and skipped[0]["where"] == f"{path}:2" and re.search(error, skipped[0]["error"])


def test_what_stage_dpo_does_not_take_yet_is_refused_with_the_key():
    base = ["--model_name_or_path=m", "--dataset=d", "--output_dir=o", "--stage=dpo"]
    for flag, key in (
        ("--packing=true", "packing"),
        ("--predict_with_generate=true", "predict_with_generate"),
        ("--pref_beta=0", "pref_beta=0"),
    ):
        with pytest.raises(UserError, match=key):
            load_config([*base, flag], None)  # fmt: skip
    with pytest.raises(UserError, match="stage"):
        load_config([*base[:-1], "--stage=rm"], None)
    # The normaliser is the pairs with a labelled answer: an evaluation padding pair (nothing labelled) is none.
    labels = torch.tensor([[-100, 5, 6], [-100, -100, -100], [-100, 7, -100], [-100, -100, -100]])
    assert Preference(PreferenceConfig(stage="dpo"), None).count({"pairs": torch.tensor(2), "labels": labels}) == 1


def test_only_the_last_answer_is_labelled_and_a_long_pair_keeps_one_prompt(tmp_path):
    tok = load_tokenizer(str(TINY_MODEL))
    history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"}]
    long_prompt = "类型#裙*颜色#红色*" * 12
    rows = [
        {"messages": history + [{"role": "user", "content": "类型#裙"}, {"role": "assistant", "content": "红色"}],
         "rejected": "蓝色"},
        {"prompt": long_prompt, "chosen": "这款红色连衣裙" * 3, "rejected": "蓝色" * 20},
    ]  # fmt: skip
    (short, long), _ = pairs_from(write(tmp_path / "p.jsonl", rows), cutoff_len=64)
    starts = []
    for pair in (short, long):
        c, r = pair.chosen, pair.rejected
        start = next(i for i, x in enumerate(c.labels) if x != -100)
        starts.append(start)
        assert c.input_ids[:start] == r.input_ids[:start] and r.labels[start - 1] == -100 != r.labels[start]
        assert all(x == -100 for x in c.labels[:start]) and c.labels[start:] == c.input_ids[start:]
        assert len(c.input_ids) <= 64 and len(r.input_ids) <= 64
    assert tok.decode(short.chosen.input_ids[: starts[0]]).count("<|assistant|>") == 2  # history kept, not trained
    assert (
        sum(x != -100 for x in long.rejected.labels) > sum(x != -100 for x in long.chosen.labels)
        or len(long.rejected.input_ids) == 64
    )  # the longer answer was cut to the room after the one prompt
    from dist_glm.data.preference import as_rows

    assert as_rows([short]) == [short.chosen, short.rejected]


def test_orpo_near_zero_log_probabilities_and_the_sft_term(monkeypatch):
    from dist_glm.objectives import preference

    pc = torch.tensor([-1e-9, -1e-3, -2.0], dtype=torch.float32, requires_grad=True)
    pr = torch.tensor([-1e-8, -5.0, -1e-12], dtype=torch.float32)
    losses, _, _ = pair_losses((pc, pr), None, (torch.ones(3), torch.ones(3)), "orpo", 0.1, 0.0)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all()
    # pref_ftx adds the chosen answer's mean NLL per token to each pair's loss.
    batch = {"pairs": torch.tensor(2), "labels": torch.tensor([[-100, 5, 6, 7], [-100, -100, 5, 6]] * 2)}
    logps = torch.tensor([-3.0, -1.0, -4.0, -2.0], dtype=torch.float64)
    monkeypatch.setattr(preference, "row_logps", lambda model, b: logps)
    cfg = PreferenceConfig(stage="dpo", pref_loss="simpo", pref_beta=2.0, pref_ftx=0.5)
    loss, parts = Preference(cfg, None)._sums(None, batch)
    lengths = torch.tensor([3.0, 2.0], dtype=torch.float64)
    simpo = -torch.nn.functional.logsigmoid(2.0 * (logps[:2] / lengths - logps[2:] / lengths) - 0.5)
    assert float(loss) == pytest.approx(float((simpo - 0.5 * logps[:2] / lengths).sum()), rel=1e-12)
    assert float(parts["rewards/accuracies"]) == 2.0 and float(parts["logps/chosen"]) == -4.0
    # An evaluation padding pair (nothing labelled) adds nothing to the sums.
    padded = {"pairs": torch.tensor(2), "labels": batch["labels"].clone()}
    padded["labels"][[1, 3]] = -100
    loss_padded, parts_padded = Preference(cfg, None)._sums(None, padded)
    assert float(loss_padded) == pytest.approx(float(simpo[0] - 0.5 * logps[0] / 3), rel=1e-12)
    assert float(parts_padded["rewards/accuracies"]) == 1.0


def test_the_reference_must_be_where_the_policy_starts():
    base = ["--model_name_or_path=m", "--dataset=d", "--output_dir=o", "--stage=dpo"]
    for flag, key in (
        ("--adapter_name_or_path=a", "set merge_adapter=true"),
        ("--init_from_checkpoint=c", "init_from_checkpoint with stage=dpo"),
        ("--neftune_noise_alpha=5", "neftune_noise_alpha with stage=dpo"),
    ):
        with pytest.raises(UserError, match=key):
            load_config([*base, flag], None)  # fmt: skip
    load_config([*base, "--adapter_name_or_path=a", "--merge_adapter=true"], None)  # the merged SFT is the reference
    load_config([*base, "--adapter_name_or_path=a", "--pref_loss=simpo"], None)  # SimPO has no reference

    class RemoteCode(torch.nn.Module):  # a model class outside transformers (remote code)
        pass

    with pytest.raises(UserError, match="remote code"):
        Preference(PreferenceConfig(stage="dpo"), None, RemoteCode())


@pytest.fixture(scope="module")
def pairs_data(tmp_path_factory):
    """64 pairs from the demo rows: the reference answer against another row's (prompts of varied length)."""
    rows = [json.loads(line) for line in (REPO / "data" / "advertisegen_demo" / "train.jsonl").read_text().splitlines()]
    pairs = [{"prompt": r["content"], "chosen": r["summary"], "rejected": rows[(i + 7) % len(rows)]["summary"]}
             for i, r in enumerate(rows[:64])]  # fmt: skip
    return write(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", pairs)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full", "ptuning"])
def test_the_same_global_batch_gives_the_same_preference_step_on_1_and_2_ranks(
    tmp_path, pretrained_tiny, pairs_data, method
):
    """LoRA (the reference is the base with the adapter off) and full (a frozen reference copy, partitioned
    under ZeRO-3): 1 rank x 4 pairs, 2 ZeRO-3 ranks x 2 pairs, and 1 rank x 2 pairs x accumulation 2 give the
    same losses and rewards in fp32; at step 1 the policy is its reference (loss ln 2, rewards 0). The
    accumulated run stops at step 2 and resumes from its checkpoint (the reference loaded again). P-tuning v2
    (a frozen copy of the base as its reference: its random initial prefix is not the base, so step 1 is not
    at ln 2) on 1 rank and 2 ZeRO-3 ranks."""
    common = dict(model_name_or_path=pretrained_tiny, train_from_scratch=False, stage="dpo", finetuning_type=method,
                  max_steps=4, learning_rate=2e-3 if method == "full" else 1e-2, pref_beta=0.5,
                  cutoff_len=128, lr_scheduler_type="constant_with_warmup")  # fmt: skip
    # LoRA also evaluates 9 held-out pairs every 2 steps: an odd count, so one rank of two gets a padding pair.
    held_out = write(tmp_path / "eval.jsonl", [json.loads(x) for x in pairs_data.read_text().splitlines()[-9:]])
    evaluating = dict(eval_dataset=held_out, eval_steps=2, per_device_eval_batch_size=2) if method == "lora" else {}
    runs = {
        "one": (dict(per_device_train_batch_size=4, **evaluating), None),
        "two_zero3": (dict(per_device_train_batch_size=2, deepspeed="ds_configs/zero3.json", **evaluating), 2),
    }
    if method == "full":
        runs["accumulated"] = (dict(per_device_train_batch_size=2, gradient_accumulation_steps=2), None)
    got = {}
    for name, (extra, ranks) in runs.items():
        out = tmp_path / name
        if name == "accumulated":
            run_train(base_args(out, pairs_data, **{**common, **extra, "max_steps": 2, "save_steps": 2}), nprocs=ranks)
            extra = dict(extra, resume_from_checkpoint=out / "checkpoint-2", save_steps=2)
        proc = run_train(base_args(out, pairs_data, **common, **extra), nprocs=ranks)
        keys = ["train/loss", "train/rewards/margins", "train/rewards/accuracies"]
        keys += ["eval/loss", "eval/rewards/margins", "eval/rewards/accuracies"] if evaluating else []
        got[name] = {k: read_metrics(out, k) for k in keys}
        assert "preference pairs: 64" in proc.stdout
    want = got["one"]
    if method == "ptuning":
        assert "reference model" in proc.stdout  # a frozen copy: the prefix is not switched off
    else:
        assert want["train/loss"][1] == pytest.approx(math.log(2), abs=1e-6)  # step 1: the policy is its reference
    for name, metrics in got.items():
        for key, curve in metrics.items():
            assert sorted(curve) == ([1, 2, 3, 4] if key.startswith("train/") else [2, 4]), (key, curve)
            assert max(abs(curve[s] - want[key][s]) for s in curve) < 1e-5, (name, key, curve, want[key])
    assert abs(want["train/rewards/margins"][1]) < 1e-6 or method == "ptuning"
    assert abs(want["train/loss"][4] - math.log(2)) > 1e-4
    if evaluating:  # a padding pair adds nothing: the eval loss is a mean over the 9 real pairs
        assert 0 < want["eval/loss"][2] < 1 and 0 <= want["eval/rewards/accuracies"][4] <= 1


@pytest.mark.slow
def test_the_dpo_demo_learns_the_preference_from_the_sft_demo(demo_run, tmp_path):
    """configs/demo_dpo.yaml from this session's SFT demo model: the policy comes to prefer every reference
    answer over its wrong-colour twin (rewards/accuracies to ~1, the margin grows) by pushing the wrong one
    down while the chosen answer stays near the likelihood the SFT model gave it."""
    sft, proc = demo_run
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = tmp_path / "demo_dpo"
    run_train(["configs/demo_dpo.yaml", "--disable_tqdm=true", f"--model_name_or_path={sft}", f"--output_dir={out}"],
              nprocs=None)  # fmt: skip
    m = {k: read_metrics(out, f"train/{k}") for k in ("rewards/accuracies", "rewards/margins", "logps/chosen",
                                                        "logps/rejected")}  # fmt: skip
    print({k: (round(v[8], 3), round(v[64], 3)) for k, v in m.items()})
    assert m["rewards/accuracies"][64] >= 0.95 > m["rewards/accuracies"][8]
    assert m["rewards/margins"][64] > 3 * m["rewards/margins"][8] > 0
    assert m["logps/rejected"][64] < m["logps/rejected"][8] - 0.5
    assert m["logps/chosen"][64] > m["logps/chosen"][8] - 0.3


def test_the_padding_log_counts_a_pair_as_its_two_padded_rows():
    from dist_glm.data.batching import Example, GlobalBatchSampler, pad_share
    from dist_glm.data.preference import Pair

    def row(n):
        return Example([1] * n, [1] * n, [], "")

    pairs = [Pair(row(10), row(100)), Pair(row(10), row(100))]  # 4 rows padded to 100: 220 real of 400
    assert pad_share(pairs, GlobalBatchSampler(2, 2, 1, 1, 0)) == pytest.approx(0.45)


@pytest.mark.slow
def test_the_three_references_give_the_same_losses(tmp_path, pretrained_tiny, pairs_data):
    """LoRA with the adapter switched off, with `ref_model` (a frozen copy of the same base) and with
    `ref_logps_cache` (launch/ref_cache.py run ahead over the training and held-out pairs): the same losses
    and eval losses at every step. A second build finds every shard written and writes none (a cache of another
    reference is refused: the fast test below). KTO's cache, mismatched rows included: tests/test_kto.py."""
    common = dict(model_name_or_path=pretrained_tiny, train_from_scratch=False, stage="dpo", finetuning_type="lora",
                  max_steps=3, learning_rate=1e-2, pref_beta=0.5, cutoff_len=128, val_size=9, eval_steps=3,
                  lr_scheduler_type="constant_with_warmup")  # fmt: skip
    cache = tmp_path / "cache"
    for _ in range(2):
        build = run_script(
            "ref_cache.py", [*base_args(tmp_path / "build", pairs_data, **common), f"--ref_logps_cache={cache}"]
        )
        assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    assert "(this rank wrote 0)" in build.stdout  # the second build resumed a finished one
    assert json.loads((cache / "manifest.json").read_text())["rows"] == 2 * 64  # both answers of each pair
    runs = {"adapter_off": {}, "ref_model": {"ref_model": pretrained_tiny}, "cache": {"ref_logps_cache": cache}}
    got = {}
    for name, extra in runs.items():
        proc = run_train(base_args(tmp_path / name, pairs_data, **common, **extra), nprocs=None)
        got[name] = {k: read_metrics(tmp_path / name, k) for k in ("train/loss", "eval/loss")}
        assert "no reference model loaded" in proc.stdout or name != "cache"
    for name, metrics in got.items():
        for key, curve in metrics.items():
            want = got["adapter_off"][key]
            assert sorted(curve) == sorted(want) and max(abs(curve[s] - want[s]) for s in curve) < 1e-5, (name, key)


def test_a_reference_cache_is_read_only_for_its_own_reference(tmp_path):
    """The cache names the reference it holds: training with another reference, or a build into a directory
    holding another reference's cache, is refused; ref_model / ref_logps_cache with a loss that needs no
    reference is a value error; a cache that is not built yet says how to build it."""
    from dist_glm.objectives.reference import read_manifest, reference_source
    from dist_glm.tools.ref_cache import _check_directory

    base = [f"--model_name_or_path={TINY_MODEL}", "--dataset=d", "--output_dir=o", "--stage=dpo",
            f"--ref_logps_cache={tmp_path}"]  # fmt: skip
    cfg = load_config(base, None)
    with pytest.raises(UserError, match="no manifest.json there; build it first with `python launch/ref_cache.py"):
        read_manifest(cfg)
    (tmp_path / "manifest.json").write_text(json.dumps({**reference_source(cfg), "rows": 1}))
    assert read_manifest(cfg)["rows"] == 1
    _check_directory(tmp_path, reference_source(cfg))  # the same reference: a build resumes
    other = load_config([*base, f"--ref_model={REPO / 'assets' / 'tiny-glm4-0414'}"], None)
    with pytest.raises(UserError, match="holds the log-probabilities of .*tiny-glm4', but this run's reference is"):
        read_manifest(other)
    with pytest.raises(UserError, match="already holds a cache of another reference"):
        _check_directory(tmp_path, reference_source(other))
    for key in ("ref_model", "ref_logps_cache"):
        with pytest.raises(UserError, match=f"{key} with pref_loss=simpo: it needs no reference model"):
            load_config([*base[:-1], "--pref_loss=simpo", f"--{key}={tmp_path}"], None)
