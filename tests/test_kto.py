"""KTO (stage=kto): the loss against a float64 reference written from the paper, the labelled-answer formats
users have (LLaMA-Factory's kto_tag, TRL's unpaired rows, a conversation with a label) with their KL rows and
bad rows, and real processes: the same global batch gives the same steps on 1 and 2 ZeRO-3 ranks and with
accumulation and a resume, because the reference point z0 is estimated over the global batch."""

import json
import math
import re

import pytest
import torch

from conftest import REPO, TINY_MODEL, base_args, read_metrics, run_script, run_train
from dist_glm.config import collect_config, load_config
from dist_glm.data.preference import load_feedback
from dist_glm.data.template import IGNORE_INDEX
from dist_glm.errors import UserError
from dist_glm.models.loading import load_tokenizer
from dist_glm.objectives.kto import kto_losses


def reference_loss(policy, reference, desirable, z0, beta, w_d, w_u) -> float:
    """One answer's KTO loss in float64 Python arithmetic (Ethayarajh et al. 2024, eq. 8, with the sigmoid value
    function): lambda_y - v(x, y), v = lambda_D sigma(beta (r - z0)) or lambda_U sigma(beta (z0 - r))."""
    r = policy - reference

    def sigma(x):
        return 1 / (1 + math.exp(-x))

    return w_d * (1 - sigma(beta * (r - z0))) if desirable else w_u * (1 - sigma(beta * (z0 - r)))


def test_the_kto_loss_equals_its_float64_reference():
    g = torch.Generator().manual_seed(0)
    policy = -torch.rand(16, generator=g, dtype=torch.float64) * 40
    reference = policy + torch.randn(16, generator=g, dtype=torch.float64) * 3
    desirable = torch.arange(16) % 3 != 0
    for z0, beta, w_d, w_u in [(0.0, 0.1, 1.0, 1.0), (0.7, 0.5, 1.33, 1.0), (2.5, 2.0, 1.0, 0.5)]:
        losses, rewards = kto_losses(policy, reference, desirable, z0, beta, w_d, w_u)
        want = [reference_loss(*v, z0, beta, w_d, w_u) for v in zip(policy.tolist(), reference.tolist(),
                                                                     desirable.tolist(), strict=True)]  # fmt: skip
        assert losses.tolist() == pytest.approx(want, abs=1e-12)
        assert rewards.tolist() == pytest.approx((beta * (policy - reference)).tolist(), abs=1e-12)


def write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def feedback_from(path, **data):
    cfg = load_config([f"--model_name_or_path={TINY_MODEL}", f"--dataset={path}", "--output_dir=/tmp/unused",
                       "--stage=kto", *[f"--{k}={v}" for k, v in data.items()]], default_yaml=None)  # fmt: skip
    return load_feedback(str(path), load_tokenizer(str(TINY_MODEL)), cfg.data, "glm4", [])


def test_every_labelled_answer_format_and_its_kl_row(tmp_path):
    tok = load_tokenizer(str(TINY_MODEL))
    rows = [
        {"prompt": "What colour is the sky?", "completion": "Blue.", "label": True},  # TRL unpaired, strings
        {"prompt": [{"role": "user", "content": "Two plus two?"}],
         "completion": [{"role": "assistant", "content": "Five."}], "label": False},  # TRL, conversational
        {"messages": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."}],
         "label": True},  # OpenAI messages with a label
    ]  # fmt: skip
    samples, counts = feedback_from(write(tmp_path / "kto.jsonl", rows))
    assert [s.desirable for s in samples] == [True, False, True] and counts == {"desirable": 2}
    answers = ["Blue.", "Five.", "Apple."]
    for i, s in enumerate(samples):
        trained = tok.decode([t for t, lab in zip(s.completion.input_ids, s.completion.labels, strict=True)
                              if lab != IGNORE_INDEX])  # fmt: skip
        assert trained.strip().startswith(answers[i])  # only the answer (and its end token) is labelled
        # The KL row: this sample's prompt followed by the next sample's answer, only that answer labelled.
        start = next(j for j, lab in enumerate(s.kl.labels) if lab != IGNORE_INDEX)
        prompt_end = next(j for j, lab in enumerate(s.completion.labels) if lab != IGNORE_INDEX)
        assert s.kl.input_ids[:start] == s.completion.input_ids[:prompt_end]
        nxt = samples[(i + 1) % 3].completion
        nxt_start = next(j for j, lab in enumerate(nxt.labels) if lab != IGNORE_INDEX)
        assert s.kl.input_ids[start:] == nxt.input_ids[nxt_start:]


def test_llamafactory_kto_entries_train_with_stage_kto_only(tmp_path):
    """Their kto_en_demo entry's shape (../shared/llamafactory/data/dataset_info.json): sharegpt `messages` with
    role/content tags and `kto_tag: label`."""
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"A{i}."}],
             "label": i % 2 == 0} for i in range(4)]  # fmt: skip
    write(tmp_path / "kto_en_demo.json", [])
    (tmp_path / "kto_en_demo.json").write_text(json.dumps(rows), encoding="utf-8")
    entry = {
        "file_name": "kto_en_demo.json",
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "kto_tag": "label"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps({"kto_en_demo": entry}), encoding="utf-8")
    common = ["--model_name_or_path=m", "--dataset=kto_en_demo", f"--dataset_dir={tmp_path}", "--output_dir=o"]
    from dist_glm.data.registry import check_stage, resolve

    for stage, ok in (("kto", True), ("sft", False), ("dpo", False)):
        cfg = load_config([*common, f"--stage={stage}"], None)
        assert resolve(cfg.data) == []
        assert any("kto_tag column" in p for p in check_stage(cfg.data, stage)) != ok, stage
    cfg = load_config([*common, "--stage=kto"], None)
    resolve(cfg.data)
    samples, counts = load_feedback(cfg.data.dataset, load_tokenizer(str(TINY_MODEL)), cfg.data, "glm4", [])
    assert len(samples) == 4 and counts == {"desirable": 2}


@pytest.mark.parametrize(
    "row, error",
    [
        ({"prompt": "Q?", "completion": "A.", "label": "yes"}, "must be true (a desirable answer) or false"),
        ({"prompt": "Q?", "completion": "A."}, "field 'label' must be true"),
        ({"prompt": "Q?", "completion": " ", "label": True}, "the answer is empty"),
        ({"text": "raw", "label": True}, "a KTO row is a conversation ending with the answer"),
    ],
)
def test_a_bad_row_names_its_line_or_is_skipped_with_the_reason(tmp_path, row, error):
    good = {"prompt": "Fine?", "completion": "Yes.", "label": True}
    path = write(tmp_path / "kto.jsonl", [good, row])
    with pytest.raises(UserError, match=f"kto.jsonl:2: .*{re.escape(error)}"):
        feedback_from(path)
    assert len(feedback_from(path, on_invalid="skip")[0]) == 1


def test_what_stage_kto_needs_is_checked_with_the_key():
    base = [f"--model_name_or_path={TINY_MODEL}", "--dataset=x.jsonl", "--output_dir=o", "--stage=kto"]
    for extra, message in [
        (["--kto_chosen_weight=0"], "kto_chosen_weight=0.0 must be positive"),
        (["--pref_beta=-1"], "pref_beta=-1.0 must be positive"),
        (["--adapter_name_or_path=a"], "adapter_name_or_path with stage=kto: the reference"),
        (["--packing=true"], "packing: not available with stage=kto yet"),
    ]:
        _, problems = collect_config(base + extra, default_yaml=None)
        assert any(message in p for p in problems), (extra, problems)


@pytest.fixture(scope="module")
def kto_data(tmp_path_factory):
    """64 demo rows: the reference answer (desirable) or another row's (undesirable), alternating, of varied
    prompt lengths."""
    rows = [json.loads(line) for line in (REPO / "data" / "advertisegen_demo" / "train.jsonl").read_text().splitlines()]
    out = [{"prompt": r["content"], "completion": r["summary"] if i % 3 else rows[(i + 7) % len(rows)]["summary"],
            "label": bool(i % 3)} for i, r in enumerate(rows[:64])]  # fmt: skip
    return write(tmp_path_factory.mktemp("kto") / "kto.jsonl", out)


@pytest.mark.slow
def test_the_same_global_batch_gives_the_same_kto_step_on_1_and_2_ranks(tmp_path, pretrained_tiny, kto_data):
    """LoRA (the reference is the base with the adapter off): 1 rank x 4 answers, 2 ZeRO-3 ranks x 2, and
    1 rank x 2 x accumulation 2 stopped at step 2 and resumed (its reference from a ref_logps_cache), give the
    same losses, z0 (train/kl) and eval in fp32. z0 is estimated over the global batch (TRL's per-micro-batch
    estimate would differ with the split). At step 1 the policy is its reference: every answer's loss is
    1 - sigmoid(0) = 0.5."""
    common = dict(model_name_or_path=pretrained_tiny, train_from_scratch=False, stage="kto", finetuning_type="lora",
                  max_steps=4, learning_rate=2e-2, pref_beta=0.5, kto_chosen_weight=1.3, cutoff_len=128,
                  lr_scheduler_type="constant_with_warmup", val_size=9, eval_steps=2,
                  per_device_eval_batch_size=2)  # fmt: skip
    # The accumulated run reads its reference from a cache built ahead (launch/ref_cache.py: the answers and
    # their mismatched rows), so it also shows that the cache gives the adapter-off numbers.
    cache = tmp_path / "cache"
    build = run_script(
        "ref_cache.py", [*base_args(tmp_path / "build", kto_data, **common), f"--ref_logps_cache={cache}"]
    )
    assert build.returncode == 0 and "no reference model loaded" not in build.stdout, build.stderr[-2000:]
    runs = {
        "one": (dict(per_device_train_batch_size=4), None),
        "two_zero3": (dict(per_device_train_batch_size=2, deepspeed="ds_configs/zero3.json"), 2),
        "accumulated": (
            dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, ref_logps_cache=cache),
            None,
        ),
    }
    keys = ["train/loss", "train/kl", "train/rewards/chosen_sum", "train/count/chosen", "eval/loss", "eval/kl"]
    got = {}
    for name, (extra, ranks) in runs.items():
        out = tmp_path / name
        if name == "accumulated":
            run_train(base_args(out, kto_data, **{**common, **extra, "max_steps": 2, "save_steps": 2}), nprocs=ranks)
            extra = dict(extra, resume_from_checkpoint=out / "checkpoint-2", save_steps=2)
        proc = run_train(base_args(out, kto_data, **common, **extra), nprocs=ranks)
        got[name] = {k: read_metrics(out, k) for k in keys}
        assert "labelled answers: 64, 42 desirable" in proc.stdout
    want = got["one"]
    share = want["train/count/chosen"][1]  # the desirable answers' share of step 1's global batch
    assert want["train/loss"][1] == pytest.approx(0.5 * (1.3 * share + (1 - share)), abs=1e-6)
    for name, metrics in got.items():
        for key, curve in metrics.items():
            assert sorted(curve) == ([1, 2, 3, 4] if key.startswith("train/") else [2, 4]), (key, curve)
            assert max(abs(curve[s] - want[key][s]) for s in curve) < 1e-5, (name, key, curve, want[key])
    assert want["train/kl"][1] == 0 and max(want["train/kl"].values()) > 1e-4  # z0 moves off 0 once trained
    assert abs(want["train/loss"][4] - want["train/loss"][1]) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("method, reference", [("qlora", "adapter switched off"), ("freeze", "reference model")])
def test_kto_trains_qlora_and_freeze(tmp_path, pretrained_tiny, kto_data, method, reference):
    """The other methods: QLoRA (its 4-bit base with the adapter off as the reference) and freeze (a frozen copy):
    step 1 is at the reference (every answer's loss 1 - sigmoid(0), weighted), later steps move, and the
    method's own artifact is saved."""
    out = tmp_path / method
    proc = run_train(base_args(out, kto_data, model_name_or_path=pretrained_tiny, train_from_scratch=False,
                               stage="kto", finetuning_type=method, max_steps=3, learning_rate=1e-2,
                               cutoff_len=128), nprocs=None)  # fmt: skip
    assert reference in proc.stdout and f"method={method}" in proc.stdout
    loss = read_metrics(out, "train/loss")
    assert loss[1] == pytest.approx(0.5, abs=1e-6) and abs(loss[3] - 0.5) > 1e-5
    assert (out / ("adapter_config.json" if method == "qlora" else "model.safetensors")).is_file()
