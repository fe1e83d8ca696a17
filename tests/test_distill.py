"""Knowledge distillation: the divergences against a straightforward reference, the chunked head path
against full logits (values and gradients), and real training runs: rank/ZeRO-3 equivalence with a
partitioned teacher, the eval KL to the teacher, and a mismatched teacher refused."""

import hashlib
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from dist_glm.config import DistillConfig, load_config
from dist_glm.data.batching import collate, model_inputs
from dist_glm.objectives import cross_entropy, distillation
from dist_glm.objectives.distillation import Distillation, KDSpec, Teacher, kd_per_token, plain_distill_sums
from tests.conftest import REPO, base_args, read_metrics, run_train

STUDENT = REPO / "assets" / "tiny-glm4-student"
TEACHER = REPO / "assets" / "tiny-glm4"


def reference_kd(student_row, teacher_row, kind, temperature, beta) -> float:
    """One token, in float64 and plain Python: softmaxes and sums written out."""
    s = [x / temperature for x in student_row]
    t = [x / temperature for x in teacher_row]
    ls, lt = math.log(sum(math.exp(x) for x in s)), math.log(sum(math.exp(x) for x in t))
    q = [math.exp(x - ls) for x in s]  # student
    p = [math.exp(x - lt) for x in t]  # teacher

    def kl(a, b):
        return sum(ai * math.log(ai / bi) for ai, bi in zip(a, b, strict=True) if ai > 0)

    if kind == "forward_kl":
        d = kl(p, q)
    elif kind == "reverse_kl":
        d = kl(q, p)
    else:
        m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q, strict=True)]
        d = beta * kl(p, m) + (1 - beta) * kl(q, m)
    return d * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_divergences_equal_the_reference(kind, temperature):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(5, 11, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(5, 11, generator=g, dtype=torch.float64) * 3
    spec = KDSpec(kind, temperature, 0.3, vocab=11)
    ref = [reference_kd(s.tolist(), t.tolist(), kind, temperature, 0.3) for s, t in zip(student, teacher, strict=True)]
    assert kd_per_token(student, teacher, spec).tolist() == pytest.approx(ref, abs=1e-6)
    # What training computes: fp32, to fp32 round-off.
    assert kd_per_token(student.float(), teacher.float(), spec).tolist() == pytest.approx(ref, rel=1e-6, abs=1e-6)
    assert kd_per_token(teacher, teacher, spec).abs().max() < 1e-6  # zero when the student is the teacher


def test_only_the_real_token_range_is_compared():
    # A padded head (GLM's config vocab_size > the tokenizer's): logits past `vocab` never matter.
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    spec = KDSpec("forward_kl", 1.0, 0.5, vocab=6)
    padded_s, padded_t = student.clone(), teacher.clone()
    padded_s[:, 6:], padded_t[:, 6:] = 50.0, -50.0
    assert torch.allclose(kd_per_token(padded_s, padded_t, spec), kd_per_token(student[:, :6], teacher[:, :6], spec))


def tiny_models():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(STUDENT)).eval()
    teacher = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TEACHER)).eval()
    return student, teacher


def tiny_batch():
    from dist_glm.data.template import IGNORE_INDEX

    g = torch.Generator().manual_seed(2)
    rows = []
    for length, prompt in ((23, 9), (15, 4), (31, 20)):
        ids = torch.randint(0, 700, (length,), generator=g).tolist()
        rows.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return rows


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("chunk_elements", [cross_entropy.CHUNK_ELEMENTS, 2 * 714 * 3])  # one chunk; many chunks
def test_chunked_distillation_equals_full_logits_values_and_gradients(monkeypatch, kind, chunk_elements):
    monkeypatch.setattr(distillation, "CHUNK_ELEMENTS", chunk_elements)
    student, teacher = tiny_models()
    batch = padded_batch()
    inputs = model_inputs(batch)
    cfg = DistillConfig(teacher_model_name_or_path="x", distill_loss=kind, distill_alpha=0.7, distill_temperature=2.0)
    objective = Distillation(Teacher(teacher, teacher.lm_head.weight.detach()), cfg, vocab=710)

    total, parts = objective.loss_sums(student, batch)
    total.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()

    teacher_logits = teacher(**inputs).logits.detach()
    ref = plain_distill_sums(student(**inputs).logits, teacher_logits, batch["labels"], objective.mix.spec)
    (0.7 * ref[1] + 0.3 * ref[0]).backward()
    assert float(parts["ce_loss"]) == pytest.approx(float(ref[0]), rel=1e-6)
    assert float(parts["kd_loss"]) == pytest.approx(float(ref[1]), rel=1e-5, abs=1e-6)
    for n, p in student.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-6, rtol=1e-4), n
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is never differentiated


def padded_batch():
    from dist_glm.data.batching import Example

    examples = [Example(ids, labels, [], "") for ids, labels in tiny_batch()]
    return collate(examples, pad_id=700)


def test_eval_reports_the_kl_to_the_teacher_and_zero_for_the_teacher_itself():
    student, teacher = tiny_models()
    batch = padded_batch()
    objective = Distillation(Teacher(teacher, teacher.lm_head.weight.detach()), DistillConfig("x"), vocab=714)
    with torch.no_grad():
        sums = objective.eval_sums(student, batch)
        own = objective.eval_sums(teacher, batch)
        ce, _ = cross_entropy.token_loss_sum(student, model_inputs(batch), batch["labels"])
    assert float(sums["loss"]) == pytest.approx(float(ce), rel=1e-6)  # eval/loss stays plain cross-entropy
    assert float(sums["kl_to_teacher"]) > 0 and abs(float(own["kl_to_teacher"])) < 1e-4


def file_digest(directory) -> str:
    h = hashlib.sha256()
    for f in sorted(directory.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory, varlen_data):
    """A briefly trained tiny GLM as the teacher: its distributions are not the student's random ones."""
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    run_train(base_args(out, varlen_data, max_steps=8), nprocs=None)
    return out


def distill_args(out, data, teacher, **extra):
    settings = dict(
        model_name_or_path=STUDENT,
        teacher_model_name_or_path=teacher,
        distill_loss="jsd",
        distill_alpha=0.6,
        distill_temperature=2.0,
        max_steps=5,
    )
    settings.update(extra)
    return base_args(out, data, **settings)


@pytest.mark.slow
def test_kd_losses_equal_on_one_rank_and_two_zero3_ranks_with_a_partitioned_teacher(
    tmp_path, varlen_data, eval_data, trained_teacher
):
    before = file_digest(trained_teacher)
    one, two = tmp_path / "one", tmp_path / "two"
    proc = run_train(distill_args(one, varlen_data, trained_teacher, eval_dataset=eval_data), nprocs=None)
    run_train(
        distill_args(
            two,
            varlen_data,
            trained_teacher,
            eval_dataset=eval_data,
            per_device_train_batch_size=2,
            deepspeed="ds_configs/zero3.json",
        ),
        nprocs=2,
    )
    for key in ("train/loss", "train/kd_loss", "train/ce_loss"):
        a, b = read_metrics(one, key), read_metrics(two, key)
        assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5], key
        for step in a:
            assert abs(a[step] - b[step]) < 2e-5, (key, step, a[step], b[step])
    a, b = read_metrics(one, "train/loss"), read_metrics(one, "train/kd_loss")
    ce = read_metrics(one, "train/ce_loss")
    assert all(abs(a[s] - (0.6 * b[s] + 0.4 * ce[s])) < 1e-5 for s in a)  # the loss is the stated mixture
    assert "distillation: jsd at T=2, alpha=0.6" in proc.stdout
    assert "teacher" in proc.stdout and "weights per rank" in proc.stdout
    # The teacher was read, never written; its in-memory copy was the files' (the eval KL recomputed
    # here from the saved files equals the one the trainer logged).
    assert file_digest(trained_teacher) == before
    logged = read_metrics(two, "eval/kl_to_teacher")[5]
    assert abs(logged - offline_kl(two, trained_teacher, eval_data)) < 1e-4


def offline_kl(student_dir, teacher_dir, eval_path) -> float:
    from dist_glm.models.artifacts import load_for_inference
    from tests.test_method_matrix import eval_examples

    tokenizer, examples = eval_examples(student_dir, eval_path)
    batch = collate(examples, tokenizer.pad_token_id)
    student, teacher = load_for_inference(str(student_dir)), load_for_inference(str(teacher_dir))
    spec = KDSpec("forward_kl", 1.0, 0.5, vocab=len(tokenizer))
    with torch.no_grad():
        s = plain_distill_sums(
            student(**model_inputs(batch)).logits, teacher(**model_inputs(batch)).logits, batch["labels"], spec
        )
    return float(s[1]) / cross_entropy.count_trainable_tokens(batch["labels"])


@pytest.mark.slow
def test_a_teacher_with_another_tokenizer_is_refused_before_loading(tmp_path, varlen_data):
    other = tmp_path / "other-teacher"
    other.mkdir()
    for f in (REPO / "assets" / "glm4-real-vocab").iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    from tests.test_model_layouts import _assets_builder

    _assets_builder().build_real_vocab_tokenizer(other)
    (other / "model.safetensors").write_bytes(b"not loaded")  # refused before any weight loads
    proc = run_train(distill_args(tmp_path / "out", varlen_data, other), nprocs=None, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "teacher_model_name_or_path=" in line]
    assert lines and "151,343 tokens" in lines[0] and "714" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_distill_values_are_checked_with_the_flag_named():
    from dist_glm.value_checks import check_distill

    assert check_distill(DistillConfig()) == []
    problems = check_distill(
        DistillConfig("t", distill_alpha=1.5, distill_temperature=0, distill_loss="jsd", distill_jsd_beta=1)
    )
    assert [p.split("=")[0] for p in problems] == ["distill_alpha", "distill_temperature", "distill_jsd_beta"]
    assert check_distill(DistillConfig(teacher_adapter_name_or_path="a"))[0].startswith("teacher_adapter_name_or_path")


def test_recipe_keys_include_distillation():
    from dist_glm.config import load_config

    cfg = load_config(
        ["--model_name_or_path=m", "--dataset=d", "--output_dir=o", f"--teacher_model_name_or_path={TEACHER}"],
        default_yaml=None,
    )
    assert cfg.distill.enabled and json.dumps(cfg.to_flat_dict())


DEMO_START, DEMO_END = "<!-- distill-results:start -->", "<!-- distill-results:end -->"


def demo_table(runs: dict[str, Path]) -> str:
    rows = [
        "| student (300 steps, 160 labelled rows) | eval loss | KL to teacher | ROUGE-L | BLEU-4 |",
        "|---|--:|--:|--:|--:|",
    ]
    for name, out in runs.items():
        m = {k: read_metrics(out, k)[300] for k in ("eval/loss", "eval/kl_to_teacher", "eval/rouge-l", "eval/bleu-4")}
        rows.append(
            f"| {name} | {m['eval/loss']:.3f} | {m['eval/kl_to_teacher']:.3f} | {m['eval/rouge-l']:.1f} | "
            f"{m['eval/bleu-4']:.1f} |"
        )
    return "\n".join(rows)


@pytest.mark.slow
def test_distillation_demo_beats_the_same_student_trained_on_labels_alone(demo_run, tmp_path):
    teacher, proc = demo_run  # the demo's model, trained by this session (conftest), never a stale out/demo
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    kd, ce = tmp_path / "demo_distill", tmp_path / "demo_student_ce"
    base = ["configs/demo_distill.yaml", "--disable_tqdm=true", f"--teacher_model_name_or_path={teacher}"]
    run_train(base + [f"--output_dir={kd}"], nprocs=None)
    run_train(base + ["--distill_alpha=0", f"--output_dir={ce}"], nprocs=None)
    last = {name: {k: read_metrics(out, k)[300] for k in ("eval/loss", "eval/kl_to_teacher")} for name, out in
            (("kd", kd), ("ce", ce))}  # fmt: skip
    # Closer to the teacher, and better on held-out labels, than cross-entropy alone for the same steps.
    assert last["kd"]["eval/kl_to_teacher"] < 0.95 * last["ce"]["eval/kl_to_teacher"], last
    assert last["kd"]["eval/loss"] < 0.97 * last["ce"]["eval/loss"], last
    table = demo_table({"distilled (forward KL, alpha 0.9)": kd, "cross-entropy only (alpha 0)": ce})
    readme = REPO / "README.md"
    text = readme.read_text(encoding="utf-8")
    block = re.search(re.escape(DEMO_START) + "\n(.*?)\n" + re.escape(DEMO_END), text, re.S)
    assert block, f"README.md lacks the {DEMO_START} ... {DEMO_END} markers"
    if os.environ.get("DIST_GLM_WRITE_DEMO") == "1":
        readme.write_text(text.replace(block.group(1), table), encoding="utf-8")
        return
    for ours, theirs in zip(table.splitlines()[2:], block.group(1).splitlines()[2:], strict=True):
        got, want = ([float(x) for x in row.strip("|").split("|")[1:]] for row in (ours, theirs))
        hint = f"README says {theirs}; this run {ours} (DIST_GLM_WRITE_DEMO=1 rewrites the table)"
        assert all(abs(g - w) <= 0.15 * w + 0.02 for g, w in zip(got[:2], want[:2], strict=True)), hint
        assert all(abs(g - w) <= 10 for g, w in zip(got[2:], want[2:], strict=True)), hint


@pytest.mark.slow
def test_offline_cache_at_full_vocabulary_equals_online_distillation(tmp_path, varlen_data, eval_data, trained_teacher):
    from tests.conftest import run_script

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "shard-00000.tmp").write_text("a file of the user's")  # a build writes beside it, never over it
    settings = dict(eval_dataset=eval_data, packing=True, cutoff_len=128, per_device_train_batch_size=2)
    build = distill_args(tmp_path / "unused", varlen_data, trained_teacher, distill_cache=cache, distill_top_k=714)
    proc = run_script("distill_cache.py", build + [f"--{k}={v}" for k, v in settings.items()])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "k=714" in proc.stdout and "(this rank wrote 1)" in proc.stdout
    again = run_script("distill_cache.py", build + [f"--{k}={v}" for k, v in settings.items()])
    assert "(this rank wrote 0)" in again.stdout  # complete shards are kept: an interrupted build resumes
    assert (cache / "shard-00000.tmp").read_text() == "a file of the user's"

    online, offline = tmp_path / "online", tmp_path / "offline"
    run_train(distill_args(online, varlen_data, trained_teacher, **settings), nprocs=None)
    # No teacher path at all: the cache is all training needs.
    proc = run_train(distill_args(offline, varlen_data, "", distill_cache=cache, **settings), nprocs=None)
    assert f"distillation from cache {cache}" in proc.stdout
    for key in ("train/kd_loss", "train/ce_loss", "eval/kl_to_teacher"):
        a, b = read_metrics(online, key), read_metrics(offline, key)
        assert a and sorted(a) == sorted(b), key
        assert all(abs(a[s] - b[s]) < 1e-5 for s in a), (key, a, b)

    # Rows the cache was not built for (another cutoff_len) are refused before training, exit 2.
    other = distill_args(tmp_path / "other", varlen_data, "", distill_cache=cache, **{**settings, "cutoff_len": 64})
    proc = run_train(other, nprocs=None, check=False)
    assert proc.returncode == 2 and "rows are not in it" in proc.stderr, proc.stderr[-2000:]


def test_top_k_distillation_at_full_k_is_the_full_divergence():
    from dist_glm.objectives.cached_distillation import _chunk_sums

    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(6, 20, generator=g), torch.randn(6, 20, generator=g)
    targets = torch.randint(0, 20, (6,), generator=g)
    spec_full = KDSpec("jsd", 2.0, 0.3, vocab=20)
    order = teacher.argsort(dim=-1, descending=True)  # the cache stores the top-k sorted, as topk returns them
    cached = _chunk_sums(lambda h: h, student, targets, order, teacher.gather(1, order), KDSpec("jsd", 2.0, 0.3, 20))
    # The same six positions through the full-logits reference (which predicts label t + 1 from position t).
    pad = torch.zeros(1, 20)
    labels = torch.cat([torch.tensor([-100]), targets]).unsqueeze(0)
    full = plain_distill_sums(torch.cat([student, pad])[None], torch.cat([teacher, pad])[None], labels, spec_full)
    assert torch.allclose(cached, full, atol=1e-5)


def test_a_conversation_written_for_the_teacher_reads_back_the_same():
    from dist_glm.data.converters import from_openai
    from dist_glm.tools.distill_generate import to_openai

    conv = {
        "system": "你是助手",
        "tools": [{"name": "get_weather", "description": "天气", "parameters": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": "北京天气?"},
            {"role": "assistant", "content": "", "tool_call": {"name": "get_weather", "arguments": '{"city": "北京"}'}},
            {"role": "observation", "content": '{"temp": 3}'},
            {"role": "assistant", "content": "3 度"},
        ],
    }
    assert from_openai(json.loads(json.dumps(to_openai(conv))), None) == conv


@pytest.mark.slow
def test_sequence_level_distillation_writes_the_teachers_greedy_answers_and_resumes(
    tmp_path, varlen_data, trained_teacher
):
    from dist_glm.data.converters import load_conversations
    from dist_glm.models.artifacts import load_for_inference
    from dist_glm.models.loading import load_tokenizer
    from tests.conftest import run_script

    out = tmp_path / "teacher.jsonl"
    args = distill_args(tmp_path / "unused", varlen_data, trained_teacher, generation_max_new_tokens=12)
    args += [f"--output_file={out}", "--max_rows=10", "--per_device_eval_batch_size=4"]
    proc = run_script("distill_generate.py", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = out.read_text(encoding="utf-8")
    rows = [json.loads(line) for line in first.splitlines()]
    assert len(rows) == 10 and rows[0]["distilled"]["teacher"] == str(trained_teacher)
    assert rows[0]["distilled"]["source"] == f"{varlen_data}:1"

    # The reply is the teacher's own greedy continuation of the prompt, as plain generate gives it.
    cfg = load_config([f"--model_name_or_path={STUDENT}", f"--dataset={varlen_data}", "--output_dir=o"], None)
    conv = load_conversations(str(varlen_data), cfg.data, [])[0]
    tok = load_tokenizer(str(TEACHER))
    text = tok.apply_chat_template(
        [{"role": "user", "content": conv["messages"][0]["content"]}], add_generation_prompt=True, tokenize=False
    )
    prompt = tok.encode(text, add_special_tokens=False)
    teacher = load_for_inference(str(trained_teacher))
    with torch.no_grad():
        gen = teacher.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=[700, 707, 709], pad_token_id=700
        )[0, len(prompt) :].tolist()
    cut = next((i for i, t in enumerate(gen) if t in (700, 707, 709)), len(gen))
    assert rows[0]["messages"][-1]["content"] == tok.decode(gen[:cut], skip_special_tokens=True).removeprefix("\n")

    # Interrupted mid-write: a rerun keeps the complete rows, drops the torn one and finishes identically.
    lines = first.splitlines(True)
    out.write_text("".join(lines[:7]) + lines[7][:10], encoding="utf-8")
    proc = run_script("distill_generate.py", args)
    assert "7 already answered" in proc.stdout and out.read_text(encoding="utf-8") == first

    # And it is an ordinary dataset: the student trains on it with cross-entropy.
    student = tmp_path / "student"
    run_train(
        base_args(student, out, model_name_or_path=STUDENT, max_steps=4, per_device_train_batch_size=2), nprocs=None
    )
    assert len(read_metrics(student, "train/loss")) == 4


def test_a_thinking_teachers_reply_keeps_its_reasoning_and_reads_back_the_same():
    from dist_glm.data.converters import from_openai
    from dist_glm.tools.distill_generate import teacher_reply, to_openai

    # glm4_7's prompt ends with <think>: the generated text starts inside the thought.
    assert teacher_reply("想一想</think>三度") == {"role": "assistant", "content": "三度", "reasoning": "想一想"}
    assert teacher_reply("\n<think>想</think>\n三度")["reasoning"] == "想"
    assert teacher_reply("三度") == {"role": "assistant", "content": "三度"}
    row = {
        "messages": [
            {"role": "user", "content": "北京和上海?"},
            {"role": "assistant", "content": "查", "reasoning_content": "两个城市", "tool_calls": [
                {"type": "function", "function": {"name": "w", "arguments": '{"city": "北京"}'}},
                {"type": "function", "function": {"name": "w", "arguments": '{"city": "上海"}'}}]},
            {"role": "tool", "content": "晴"},
            {"role": "tool", "content": "雨"},
            {"role": "assistant", "content": "晴和雨", "reasoning_content": "汇总"},
        ]
    }  # fmt: skip
    conv = from_openai(row, None)
    assert from_openai(json.loads(json.dumps(to_openai(conv))), None) == conv
