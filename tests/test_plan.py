"""The memory planner (dist_glm.planning.planner): its counts against real models, its arithmetic against the ZeRO
paper's accounting worked by hand, its one-line errors, and its prediction against a real training
process's measured peak."""

import json
from dataclasses import replace

import pytest

from conftest import REPO, TINY_MODEL, child_env, run_script
from dist_glm import config
from dist_glm.cli import plan_main
from dist_glm.planning.planner import BUCKET_ELEMENTS, plan_rows, recommend
from dist_glm.planning.trace import Trace, trace

# glm-4-9b-chat-hf's config.json (huggingface.co/THUDM/glm-4-9b-chat-hf), as documented there.
GLM4_9B = {
    "architectures": ["GlmForCausalLM"],
    "model_type": "glm",
    "attention_bias": True,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 13696,
    "max_position_embeddings": 131072,
    "num_attention_heads": 32,
    "num_hidden_layers": 40,
    "num_key_value_heads": 2,
    "partial_rotary_factor": 0.5,
    "rms_norm_eps": 1.5625e-07,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "vocab_size": 151552,
    "pad_token_id": 151329,
    "eos_token_id": [151329, 151336, 151338],
}
GIB = 2**30


def recipe(*flags: str) -> config.Config:
    args = [f"--model_name_or_path={TINY_MODEL}", "--dataset=x.jsonl", "--output_dir=out", *flags]
    sections, problems = config.parse_command(args, config.TRAIN)
    assert not problems, problems
    return config.Config(**sections)


def real_counts(cfg) -> tuple[int, int]:
    """(trainable, total) of the model actually built on CPU and prepared by the method."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dist_glm.methods import get_method

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_MODEL))
    model = get_method(cfg.method.finetuning_type).make_trainable(model, cfg)
    return (
        sum(p.numel() for p in model.parameters() if p.requires_grad),
        sum(p.numel() for p in model.parameters()),
    )


@pytest.mark.parametrize(
    "flags",
    [
        ["--finetuning_type=full"],
        ["--finetuning_type=freeze", "--freeze_trainable_layers=1"],
        ["--finetuning_type=lora", "--lora_rank=4"],
        ["--finetuning_type=ptuning", "--pre_seq_len=8"],
    ],
)
def test_counts_on_the_meta_device_equal_the_real_models(flags):
    cfg = recipe(*flags)
    tr = trace(cfg)
    assert (tr.trainable_params, tr.total_params) == real_counts(cfg)


def test_activations_scale_with_the_batch_and_checkpointing_keeps_layer_inputs():
    small, big = trace(recipe("--bf16", "--cutoff_len=64")), trace(recipe("--bf16", "--cutoff_len=128"))
    # Linear in tokens but for the attention mask, B x T x T: between 2x and 4x the bytes per layer.
    assert all(2 * a <= b <= 4 * a for a, b in zip(small.layer_saved_bytes, big.layer_saved_bytes, strict=True))
    assert big.layer_input_bytes == 1 * 128 * 128 * 2  # batch x tokens x hidden x bf16
    # Freeze (last layer trains): layers before it keep nothing for backward.
    frozen = trace(recipe("--bf16", "--finetuning_type=freeze", "--freeze_trainable_layers=1"))
    assert frozen.layer_saved_bytes[:-1] == [0, 0, 0] and frozen.layer_saved_bytes[-1] > 0


def hand_trace(psi: int, psi_t: int) -> Trace:
    """A model with no activations, so the rows hold the model states alone."""
    return Trace(psi, psi_t, 0, 10, largest_trainable_params=10, small_params=0, layer_saved_bytes=[0], vocab_size=1)


def test_model_states_follow_the_zero_paper():
    # Rajbhandari et al. 2020, sec. 3: bf16 weights and gradients (2 + 2 bytes), fp32 master + Adam
    # moments (12 bytes), each term divided by N from the stage that partitions it.
    psi, n = 1_000_000, 4
    cfg = recipe("--bf16", "--finetuning_type=full", "--cutoff_len=8")
    rows = {r.name: r for r in plan_rows(hand_trace(psi, psi), cfg, n)}
    assert (rows["zero0"].params, rows["zero0"].grads, rows["zero0"].optimizer) == (2 * psi, 2 * psi, 12 * psi)
    assert (rows["zero1"].params, rows["zero1"].grads, rows["zero1"].optimizer) == (2 * psi, 2 * psi, 3 * psi)
    assert (rows["zero2"].params, rows["zero2"].grads, rows["zero2"].optimizer) == (2 * psi, psi // 2, 3 * psi)
    # ZeRO-3: the partition plus the module being gathered and the prefetch bucket, all of this small model.
    assert rows["zero3"].params == 2 * psi // n + 2 * psi
    assert rows["zero3"].grads == psi // 2 and rows["zero3"].optimizer == 3 * psi
    # Gradient buckets of 5e8 bf16 elements, whatever the model's size: one at ZeRO-1/3, two at ZeRO-2.
    assert (rows["zero1"].buffers, rows["zero2"].buffers) == (BUCKET_ELEMENTS * 2, BUCKET_ELEMENTS * 4)
    # Offload: no optimizer state or gradient partition on the GPU; 16 bytes per trained parameter / N
    # on the host (fp32 master, two moments, fp32 gradients), plus the bf16 partition with offload_param.
    assert rows["zero2_offload"].optimizer == rows["zero2_offload"].grads == 0
    assert rows["zero2_offload"].host_per_rank == 16 * psi // n
    assert rows["zero3_offload"].host_per_rank == 16 * psi // n + 2 * psi // n
    # fp32: the weights are Adam's own at ZeRO-0 (4 + 4 + 8); ZeRO 1-3 still keep a fp32 copy (12 / N).
    fp32 = {r.name: r for r in plan_rows(hand_trace(psi, psi), recipe("--cutoff_len=8"), n)}
    assert (fp32["zero0"].params, fp32["zero0"].grads, fp32["zero0"].optimizer) == (4 * psi, 4 * psi, 8 * psi)
    assert fp32["zero0"].step_grads == 4 * psi and fp32["zero2"].optimizer == 3 * psi  # Adam's denominator


def test_qlora_base_is_stored_in_4_bits():
    cfg = recipe("--bf16", "--finetuning_type=qlora", "--double_quantization=false")
    tr = trace(cfg)
    lora = trace(recipe("--bf16", "--finetuning_type=lora"))
    assert tr.trainable_params == lora.trainable_params and tr.quantized_params > 0
    rows = {r.name: r for r in plan_rows(tr, cfg, 1)}
    # 4-bit nf4 without double quantization: half a byte plus an fp32 absmax per 64 weights.
    expected = (tr.total_params - tr.quantized_params) * 2 + tr.quantized_params * (0.5 + 4 / 64)
    assert rows["zero0"].params == int(expected)


def test_the_head_buffer_is_one_chunk_of_logits():
    from dist_glm.objectives.cross_entropy import CHUNK_ELEMENTS

    cfg = recipe("--bf16", "--per_device_train_batch_size=4", "--cutoff_len=2048")
    tr = replace(hand_trace(10, 10), hidden_size=4096, vocab_size=151552)
    act = plan_rows(tr, cfg, 1)[0].act
    chunk_tokens = CHUNK_ELEMENTS // 151552  # 221 tokens of GLM-4's vocabulary, not 8192
    assert act.head_chunk == chunk_tokens * 151552 * (3 * 2 + 6)
    assert act.head_saved == 4 * 2048 * 4096 * 2


def test_the_recommendation_is_the_cheapest_that_fits():
    cfg = recipe("--bf16", "--finetuning_type=full")
    rows = plan_rows(hand_trace(10**9, 10**9), cfg, 8)
    by_name = {r.name: r for r in rows}
    # Everything fits in a huge GPU: ZeRO-0 without checkpointing.
    assert recommend(rows, 10**6 * GIB)[0].name == "zero0"
    # 1B parameters on 8 ranks: ZeRO-1 holds 2 + 2 + 12/8 bytes a parameter, + 8/8 for the step's fp32
    # gradients and Adam's denominator, + a 1 GB bucket = 7.5 GB; ZeRO-2 2 + (2 + 12 + 8)/8 + two buckets
    # = 6.75 GB; ZeRO-3 (2 + 2 + 12 + 8)/8 + one bucket + the gathered module and prefetch bucket = 4.1 GB.
    row, gc = recommend(rows, 5 * GIB)
    assert row.name == "zero3" and not gc and by_name["zero2"].total(False) > 5 * GIB
    assert by_name["zero3"].total(False) == (2 + 2 + 12 + 8) * 10**9 // 8 + 10**9 + (10 + 50_000_000) * 2
    assert recommend(rows, 0.1 * GIB) is None


def plan_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        plan_main(list(args))
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    "args,expect",
    [
        (["configs/demo.yaml", "--num_gpu=8"], "unknown key 'num_gpu'; did you mean 'num_gpus'?"),
        (["configs/demo.yaml", "--model_name_or_path=/no/such/model"], "/no/such/model': no config.json there"),
        (["configs/demo.yaml", "--num_gpus=0"], "num_gpus=0 must be at least 1"),
        (["configs/nope.yaml"], "config file 'configs/nope.yaml' not found"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(capsys, args, expect):
    code, lines = plan_cli(capsys, *args)
    assert code == 2 and len(lines) == 1 and expect in lines[0], lines


@pytest.mark.slow
def test_glm4_9b_from_its_config_json_alone(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GLM4_9B))
    proc = run_script("plan.py", ["configs/glm4_9b_full.yaml", f"--model_name_or_path={tmp_path}", "--num_gpus=8"])
    assert proc.returncode == 0, proc.stderr
    h, kv, inter, vocab, layers = 4096, 2 * 128, 13696, 151552, 40
    # Worked from the shapes: q/k/v with biases, o, fused gate_up, down, two norms a layer; final norm;
    # untied embedding and head.
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + h * 2 * inter + inter * h + 2 * h
    total = 2 * vocab * h + layers * layer + h
    assert f"{total / 1e9:.3g}B parameters" in proc.stdout, proc.stdout
    assert "Recommended: --deepspeed=ds_configs/" in proc.stdout
    # Full fine-tuning at 16 bytes a parameter (150 GB) cannot be ZeRO-0 on 80 GB; ZeRO-3 holds a partition.
    fits = {
        cells[1].split()[0]: cells[10].strip()
        for cells in (line.split("|") for line in proc.stdout.splitlines())
        if len(cells) > 11 and cells[1].strip().startswith("zero")
    }
    assert fits["zero0"] == "no" and fits["zero3"] in ("yes", "with GC"), proc.stdout


@pytest.mark.slow
def test_prediction_matches_a_measured_training_peak(tmp_path):
    """Full fine-tuning of the tiny GLM under ZeRO-0 in bf16, one real training process on CPU:
    activations dominate at 16 x 256 tokens. Measured = peak bytes of live tensors from the moment the
    model loads (benchmarks.plan_measure); predicted = the planner's ZeRO-0 total."""
    from benchmarks.plan_measure import measure

    rows = [json.loads(line) for line in (REPO / "data/advertisegen_demo/train.jsonl").open()][:64]
    data = tmp_path / "long.jsonl"
    with data.open("w") as f:
        for i, r in enumerate(rows):
            # Odd rows exceed cutoff_len (truncated to it), even rows fall a few tokens short (~25 tokens a
            # repetition): every batch is padded to cutoff_len and nearly every token is labelled, the
            # planner's worst case.
            k = 20 if i % 2 else 9
            f.write(json.dumps({"content": r["content"] * k, "summary": r["summary"] * k}, ensure_ascii=False) + "\n")
    flags = ["--bf16", "--finetuning_type=full", "--per_device_train_batch_size=16", "--cutoff_len=256"]
    argv = [
        f"--model_name_or_path={TINY_MODEL}",
        "--train_from_scratch=true",
        f"--dataset={data}",
        f"--output_dir={tmp_path / 'out'}",
        "--max_steps=2",
        "--save_steps=0",
        "--train_on_prompt=true",
        "--disable_tqdm=true",
        *flags,
    ]
    measured = measure(tmp_path / "measured", argv, ranks=1, env=child_env())[0]["peak_bytes"]
    cfg = recipe(*flags)
    predicted = plan_rows(trace(cfg), cfg, 1)[0].total(gc=False)
    assert abs(measured - predicted) <= 0.15 * measured, (measured, predicted)


@pytest.mark.slow
@pytest.mark.parametrize("ranks,flags", [(1, []), (2, ["--deepspeed=ds_configs/zero3.json"])], ids=["zero0", "zero3x2"])
def test_moe_prediction_matches_measured_training_peaks(tmp_path, ranks, flags):
    """The tiny glm4_moe (8 routed experts top-2, a shared expert, a dense first layer), fully trained in bf16:
    one process at ZeRO-0 (experts' weights, gradients, Adam states and the routed activations are the
    whole peak) and 2 ZeRO-3 ranks (each holding half of every expert): the planner's row within 15% of the
    peak each rank measured."""
    from benchmarks.plan_measure import measure

    model = REPO / "assets" / "tiny-glm4-moe"
    rows = [json.loads(line) for line in (REPO / "data/advertisegen_demo/train.jsonl").open()][:64]
    data = tmp_path / "long.jsonl"
    with data.open("w") as f:
        for i, r in enumerate(rows):  # padded to cutoff_len, nearly every token labelled (as above)
            k = 20 if i % 2 else 9
            f.write(json.dumps({"content": r["content"] * k, "summary": r["summary"] * k}, ensure_ascii=False) + "\n")
    flags = ["--bf16", "--finetuning_type=full", "--per_device_train_batch_size=16", "--cutoff_len=256", *flags]
    argv = [f"--model_name_or_path={model}", "--train_from_scratch=true", f"--dataset={data}",
            f"--output_dir={tmp_path / 'out'}", "--max_steps=2", "--save_steps=0", "--train_on_prompt=true",
            "--disable_tqdm=true", *flags]  # fmt: skip
    measured = [r["peak_bytes"] for r in measure(tmp_path / "measured", argv, ranks=ranks, env=child_env())]
    sections, problems = config.parse_command(
        [f"--model_name_or_path={model}", "--dataset=x.jsonl", "--output_dir=out", *flags], config.TRAIN
    )
    assert not problems, problems
    cfg = config.Config(**sections)
    stage = 3 if ranks == 2 else 0
    row = next(r for r in plan_rows(trace(cfg), cfg, ranks) if r.stage == stage and not r.offload_optimizer)
    predicted = row.total(gc=False)
    assert len(measured) == ranks
    for peak in measured:
        assert abs(peak - predicted) <= 0.15 * peak, (measured, predicted)


def test_the_headline_command_runs_out_of_the_box(capsys):
    # docs/planning.md's first command, on a fresh clone: the recipe names /models/glm-4-9b-chat-hf, which
    # is not there; the shipped config.json of that model (a fact, no weights) is planned with instead.
    plan_main(["configs/glm4_9b_full.yaml", "--num_gpus=8", "--gpu_memory_gb=80"])
    out = capsys.readouterr().out
    assert "planning from the shipped config.json of glm-4-9b-chat-hf" in out
    line = next(x for x in out.splitlines() if x.startswith("Recommended:"))
    assert "left are for the CUDA context, NCCL's buffers and allocator fragmentation" in line
    assert "of host RAM while the model loads" in line and "no GPU measurement has checked them yet" in line
    with pytest.raises(SystemExit) as code:
        plan_main(["configs/glm4_9b_full.yaml", "--model=glm-99"])
    assert code.value.code == 2 and "model='glm-99': no such shipped config" in capsys.readouterr().err
