"""evaluate.py, chat.py and export.py on real trained artifacts of the tiny GLM.

- export: a merged LoRA / QLoRA model computes the adapter model's logits; a checkpoint (ZeRO-0 adapter,
  2-rank ZeRO-3 full) exports the same weights as the run's final artifact;
- evaluate: reproduces the trainer's own eval loss and predictions, from the adapter and from a checkpoint;
- chat: driven through stdin (streaming, history, clear, system prompt, EOF, Ctrl-C);
- user mistakes exit 2 with one line each.

The trained artifacts are shared by the module, so each training run happens once.
"""

import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import REPO, base_args, child_env, run_script, run_train
from dist_glm.models.artifacts import ModelArgs, load_for_inference
from dist_glm.models.loading import generation_eos_ids, load_tokenizer
from dist_glm.tools.chat import ChatArgs, ChatSession
from dist_glm.training.scoring import generation_metrics

# fp32 on CPU: merging W + s * B @ A only reorders float additions (measured 1.3e-6 on logits of size ~2).
LORA_MERGE_ATOL = 1e-5
# The merged QLoRA model is the de-quantized 4-bit base plus the adapter, which is what the adapter model
# computes on CPU, where bitsandbytes de-quantizes to the fp32 compute dtype as well (measured 7e-7; merging
# into the original fp32 base instead: 0.3).
QLORA_MERGE_ATOL = 1e-5
EVAL_FLAGS = ["--cutoff_len=96", "--per_device_eval_batch_size=4", "--generation_max_new_tokens=12"]


def adapter_run(out, data, base, eval_data, method: str, **kw):
    """A short adapter run on the saved tiny base that evaluates (with generation) at its last step."""
    run_train(
        base_args(
            out,
            data,
            model_name_or_path=base,
            train_from_scratch=False,
            finetuning_type=method,
            lora_rank=4,
            lora_alpha=8,
            learning_rate=1e-2,
            eval_dataset=eval_data,
            predict_with_generate=True,
            generation_max_new_tokens=12,
            per_device_eval_batch_size=4,
            **kw,
        ),
        nprocs=None,
    )
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, varlen_data, pretrained_tiny, eval_data):
    out = tmp_path_factory.mktemp("lora") / "out"
    return adapter_run(out, varlen_data, pretrained_tiny, eval_data, "lora", max_steps=6, save_steps=6)


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, varlen_data, pretrained_tiny, eval_data):
    out = tmp_path_factory.mktemp("qlora") / "out"
    return adapter_run(out, varlen_data, pretrained_tiny, eval_data, "qlora", max_steps=4, quantization_bit=4)


def logits_of(model) -> torch.Tensor:
    ids = torch.randint(0, 700, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits.float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ---------------------------------------------------------------- export


@pytest.mark.slow
def test_lora_export_computes_the_adapter_logits(lora_run, pretrained_tiny, tmp_path):
    from dist_glm.cli import export_main

    merged = tmp_path / "merged"  # in-process: the slow ZeRO-3 test runs launch/export.py itself
    export_main(
        [f"--model_name_or_path={pretrained_tiny}", f"--adapter_name_or_path={lora_run}", f"--export_dir={merged}"]
    )
    names = {p.name for p in merged.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= names
    assert "adapter_config.json" not in names
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"] == [700, 707, 709]

    adapter_logits = logits_of(load_for_inference(str(pretrained_tiny), str(lora_run)))
    merged_logits = logits_of(AutoModelForCausalLM.from_pretrained(merged).eval())
    assert max_diff(merged_logits, adapter_logits) < LORA_MERGE_ATOL
    base_logits = logits_of(AutoModelForCausalLM.from_pretrained(pretrained_tiny).eval())
    assert max_diff(adapter_logits, base_logits) > 1e-2, "the adapter changed nothing"

    # The run's last checkpoint (ZeRO-0, adapter weights only) exports the same model.
    from dist_glm.tools.export import ExportArgs, export

    from_ckpt = export(
        ModelArgs(model_name_or_path=str(lora_run / "checkpoint-6")), ExportArgs(export_dir=str(tmp_path / "c"))
    )
    a, b = load_file(from_ckpt / "model.safetensors"), load_file(merged / "model.safetensors")
    assert a.keys() == b.keys()
    assert max(max_diff(a[k], b[k]) for k in a) < 1e-6


@pytest.mark.slow
def test_qlora_export_merges_into_the_dequantized_base(qlora_run, pretrained_tiny, tmp_path):
    from peft import PeftModel

    from dist_glm.tools.export import ExportArgs, export

    out = export(ModelArgs(model_name_or_path=str(qlora_run)), ExportArgs(export_dir=str(tmp_path / "merged")))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    weights = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())

    adapter_logits = logits_of(load_for_inference(str(qlora_run)))  # 4-bit base + adapter, as trained
    merged_logits = logits_of(AutoModelForCausalLM.from_pretrained(out).eval())
    ours = max_diff(merged_logits, adapter_logits)
    assert ours < QLORA_MERGE_ATOL
    # Merging into the original full-precision base instead would be a model the adapter never trained with.
    naive = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pretrained_tiny), qlora_run)
    assert max_diff(logits_of(naive.merge_and_unload().eval()), adapter_logits) > 100 * max(ours, 1e-6)


def test_dora_and_modules_to_save_merge_to_the_adapter_logits(pretrained_tiny, tmp_path):
    """rsLoRA + DoRA + a fully trained lm_head copy, with random (as if trained) weights: merging keeps the logits."""
    from dist_glm.config import load_config
    from dist_glm.methods import lora
    from dist_glm.tools.export import ExportArgs, export

    flags = ["--use_rslora", "--use_dora", "--lora_modules_to_save=lm_head", "--lora_rank=4"]
    cfg = load_config(["--model_name_or_path=m", "--dataset=d", "--output_dir=o", *flags])
    model = lora.make_trainable(AutoModelForCausalLM.from_pretrained(pretrained_tiny), cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    lora.save_artifact(model, state, load_tokenizer(str(pretrained_tiny)), tmp_path / "adapter")
    out = export(
        ModelArgs(model_name_or_path=str(tmp_path / "adapter")), ExportArgs(export_dir=str(tmp_path / "merged"))
    )
    adapter_logits = logits_of(load_for_inference(str(tmp_path / "adapter")))
    assert max_diff(logits_of(AutoModelForCausalLM.from_pretrained(out).eval()), adapter_logits) < LORA_MERGE_ATOL
    base_logits = logits_of(AutoModelForCausalLM.from_pretrained(pretrained_tiny).eval())
    assert max_diff(adapter_logits, base_logits) > 1e-2


@pytest.mark.slow
def test_zero3_checkpoint_exports_the_final_model(tmp_path, varlen_data):
    out = tmp_path / "z3"
    run_train(
        base_args(
            out,
            varlen_data,
            deepspeed="ds_configs/zero3.json",
            per_device_train_batch_size=2,
            max_steps=4,
            save_steps=4,
        ),
        nprocs=2,
    )
    ckpt = out / "checkpoint-4"
    assert len(list((ckpt / "deepspeed").glob("*zero_pp_rank_*_optim_states.pt"))) == 2  # partitioned
    exported = tmp_path / "exported"
    proc = run_script("export.py", [f"--model_name_or_path={ckpt}", f"--export_dir={exported}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The checkpoint's fp32 master weights, stitched from both ranks, are the weights the run gathered
    # for its own final export (the same step).
    got, final = load_file(exported / "model.safetensors"), load_file(out / "model.safetensors")
    assert got.keys() == final.keys()
    for name in got:
        assert got[name].shape == final[name].shape and torch.equal(got[name], final[name]), name


# ---------------------------------------------------------------- evaluate


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_evaluate_reproduces_the_trainers_eval(lora_run, pretrained_tiny, eval_data, tmp_path):
    trainer = json.loads((lora_run / "all_results.json").read_text())
    trainer_predictions = [r["prediction"] for r in read_jsonl(lora_run / "generated_predictions.jsonl")]
    runs = {
        # base + adapter, settings as flags
        "adapter": [
            f"--model_name_or_path={pretrained_tiny}",
            f"--adapter_name_or_path={lora_run}",
            f"--eval_dataset={eval_data}",
            *EVAL_FLAGS,
        ],
        # a checkpoint alone, settings from its own training recipe
        "checkpoint": [str(lora_run / "checkpoint-6" / "config.yaml"), f"--model_name_or_path={lora_run}/checkpoint-6"],
    }
    for name, args in runs.items():
        out = tmp_path / name
        proc = run_script("evaluate.py", [*args, f"--output_dir={out}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads((out / "eval_results.json").read_text())
        rows = read_jsonl(out / "generated_predictions.jsonl")
        assert results["eval/samples"] == len(rows) == 8
        assert set(rows[0]) == {"prompt", "prediction", "reference"}
        assert results["eval/loss"] == pytest.approx(trainer["eval/loss"], abs=1e-5), name
        assert [r["prediction"] for r in rows] == trainer_predictions, name
        recomputed = generation_metrics([r["prediction"] for r in rows], [r["reference"] for r in rows])
        for key, value in recomputed.items():
            assert results[f"eval/{key}"] == pytest.approx(value), (name, key)
            assert results[f"eval/{key}"] == pytest.approx(trainer[f"eval/{key}"]), (name, key)


# ---------------------------------------------------------------- chat


def greedy_reply(model, tokenizer, messages, max_new_tokens) -> str:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    out = model.generate(
        input_ids=torch.tensor([ids]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=generation_eos_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).removeprefix("\n")


@pytest.mark.slow
def test_chat_through_stdin_streams_keeps_history_and_clears(lora_run, pretrained_tiny):
    system, questions = "你是广告文案助手", ["类型#裙*颜色#红色", "类型#上衣*颜色#白色", "类型#裤*风格#简约"]
    flags = [
        f"--model_name_or_path={pretrained_tiny}",
        f"--adapter_name_or_path={lora_run}",
        f"--system={system}",
        "--max_new_tokens=16",
    ]
    stdin = f"{questions[0]}\n{questions[1]}\nclear\n{questions[2]}\n"  # then end of input
    proc = subprocess.run(
        [sys.executable, "launch/chat.py", *flags],
        input=stdin,
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]

    # What greedy generation gives for each conversation, computed here without streaming.
    model, tokenizer = load_for_inference(str(pretrained_tiny), str(lora_run)), load_tokenizer(str(lora_run))
    sys_turn = [{"role": "system", "content": system}]
    first = greedy_reply(model, tokenizer, sys_turn + [{"role": "user", "content": questions[0]}], 16)
    history = [{"role": "user", "content": questions[0]}, {"role": "assistant", "content": first}]
    second = greedy_reply(model, tokenizer, sys_turn + history + [{"role": "user", "content": questions[1]}], 16)
    after_clear = greedy_reply(model, tokenizer, sys_turn + [{"role": "user", "content": questions[2]}], 16)
    expected = f"Assistant: {first}\n\nUser: Assistant: {second}\n\nUser: [dist_glm] history cleared\n\nUser: "
    expected += f"Assistant: {after_clear}\n\nUser: \n"
    assert proc.stdout.endswith(expected), proc.stdout[-2000:]
    assert f"system prompt: {system}" in proc.stdout

    # The reply arrives in pieces as tokens are generated (the untrained base writes one word per token,
    # which the streamer passes on at once), and a stopped reply ends early and stays out of the history.
    session = ChatSession(ModelArgs(model_name_or_path=str(pretrained_tiny)), ChatArgs(max_new_tokens=16))
    pieces = list(session.reply(questions[0], threading.Event()))
    base = AutoModelForCausalLM.from_pretrained(pretrained_tiny).eval()
    user = [{"role": "user", "content": questions[0]}]
    assert len(pieces) > 1 and "".join(pieces) == greedy_reply(base, tokenizer, user, 16)
    assert session.history == user + [{"role": "assistant", "content": "".join(pieces)}]
    session.clear()
    stop = threading.Event()
    stream = session.reply(questions[0], stop)
    next(stream)
    stop.set()
    assert 1 + len(list(stream)) < len(pieces) and session.history == []


@pytest.mark.slow
def test_chat_ctrl_c_at_the_prompt_exits_cleanly(pretrained_tiny):
    proc = subprocess.Popen(
        [sys.executable, "launch/chat.py", f"--model_name_or_path={pretrained_tiny}", "--max_new_tokens=4"],
        cwd=REPO,
        env=child_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    seen, deadline = b"", time.time() + 300
    while b"User: " not in seen and time.time() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            seen += os.read(proc.stdout.fileno(), 4096)
    assert b"User: " in seen, seen
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and b"Traceback" not in err, err.decode()[-2000:]


class FakeSession:
    """A session that replies 'ab' in two pieces, or is interrupted (Ctrl-C) after the first."""

    def __init__(self, interrupt=False):
        self.args, self.source, self.cleared, self.interrupt = ChatArgs(), "fake", 0, interrupt

    def clear(self):
        self.cleared += 1

    def reply(self, query, stop):
        yield "a"
        if self.interrupt:
            raise KeyboardInterrupt
        yield "b"


@pytest.mark.parametrize("interrupt", [False, True])
def test_chat_loop_commands(monkeypatch, capsys, interrupt):
    from dist_glm.tools.chat import chat_loop

    lines = iter(["hi", "", "clear", "exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": print(prompt, end="") or next(lines))
    session = FakeSession(interrupt)
    chat_loop(session)
    out = capsys.readouterr().out
    assert session.cleared == 1 and next(lines) == "never read"
    assert ("Assistant: a [interrupted]\n" if interrupt else "Assistant: ab\n") in out


# ---------------------------------------------------------------- user mistakes


@pytest.fixture(scope="module")
def ptuning_prefix(tmp_path_factory, pretrained_tiny):
    """A real P-tuning v2 artifact (untrained prefix), written the way training writes it."""
    from dist_glm.config import load_config
    from dist_glm.methods import ptuning

    cfg = load_config(["--model_name_or_path=m", "--dataset=d", "--output_dir=o", "--finetuning_type=ptuning"])
    cfg.method.pre_seq_len = 4
    model = ptuning.make_trainable(AutoModelForCausalLM.from_pretrained(pretrained_tiny), cfg)
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    out = tmp_path_factory.mktemp("ptuning") / "prefix"
    ptuning.save_artifact(model, state, load_tokenizer(str(pretrained_tiny)), out)
    return out


def user_error_cases(base, prefix, tmp):
    (tmp / "full").mkdir()
    (tmp / "full" / "x").write_text("")
    (tmp / "run" / "checkpoint-3").mkdir(parents=True)
    (tmp / "run" / "checkpoint-3" / "trainer_state.json").write_text("{}")
    (tmp / "run" / "checkpoint-3" / ".dist_glm_checkpoint").write_text("")  # dist_glm's marker
    (tmp / "e.jsonl").write_text('{"content": "a", "summary": "b"}\n')
    adapter = tmp / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "b"}))
    return [
        ("evaluate", ["--model_name_or_path=/no/such/dir", "--eval_dataset=e.jsonl"], r"no such directory"),
        ("evaluate", [f"--model_name_or_path={base}", f"--output_dir={tmp / 'eval'}"], r"eval_dataset is required"),
        ("evaluate", [f"--model_name_or_path={base}", f"--eval_dataset={tmp / 'e.jsonl'}"], r"output_dir is required"),
        ("evaluate", ["--eval_datset=e.jsonl"], r"unknown key 'eval_datset'; did you mean 'eval_dataset'\?"),
        ("evaluate", [f"--model_name_or_path={tmp / 'run'}"], r"no final model .* e\.g\. .*checkpoint-3"),
        ("chat", [f"--adapter_name_or_path={adapter}"], r"needs its base model: pass --model_name_or_path=BASE"),
        ("chat", [f"--model_name_or_path={adapter}"], r"is an adapter trained on 'b', which is not a model"),
        ("chat", [f"--model_name_or_path={base}", "--dtype=fp8"], r"dtype='fp8' is not supported"),
        ("export", [f"--model_name_or_path={prefix}", f"--export_dir={tmp / 'o1'}"], r"P-tuning v2 prefix cannot"),
        ("export", [f"--model_name_or_path={base}", f"--export_dir={tmp / 'full'}"], r"is not empty; pass --overwrite"),
        ("export", [f"--model_name_or_path={base}", f"--export_dir={base}"], r"overlaps the model being exported"),
        ("export", [f"--model_name_or_path={base}"], r"export_dir is required"),
    ]


def test_user_errors_exit_2_with_one_line_each(tmp_path, capsys, pretrained_tiny, ptuning_prefix):
    from dist_glm import cli

    for tool, args, match in user_error_cases(pretrained_tiny, ptuning_prefix, tmp_path):
        with pytest.raises(SystemExit) as exit_info:
            getattr(cli, f"{tool}_main")(args)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(lines) == 1, (tool, args, lines)
        assert lines[0].startswith(f"{tool}.py: error: ") and re.search(match, lines[0]), (tool, args, lines)
    assert not (tmp_path / "o1").exists()
