"""Every tuning method under every ZeRO stage, with and without offload, on 2 real ranks: the loss is
finite and falls, the trainer's eval (loss and generation) runs, and the saved artifact reloads
(dist_glm.models.artifacts) to the same eval loss the trainer reported at its last step and, in fp32, generates
the trainer's own predictions token for token. The offload cells also run bf16 with gradient
checkpointing.

The README's compatibility table is rendered from these results (last test below); to refresh it
after a change: `DIST_GLM_WRITE_COMPAT=1 .venv/bin/python -m pytest tests/test_method_matrix.py`.
"""

import json
import math
import os
import re

import pytest
import torch

from conftest import REPO, base_args, read_metrics, run_train
from dist_glm.config import load_config
from dist_glm.data.batching import collate, model_inputs
from dist_glm.data.preprocess import tokenize_dataset
from dist_glm.models.artifacts import generation_eos_ids_of, load_for_inference
from dist_glm.models.loading import load_tokenizer
from dist_glm.objectives.cross_entropy import count_trainable_tokens, plain_token_loss_sum

METHODS = {
    "full": {"learning_rate": 2e-3},
    "freeze": {"freeze_trainable_layers": 1, "learning_rate": 5e-3},
    "lora": {"lora_rank": 4, "learning_rate": 1e-2},
    "qlora": {"lora_rank": 4, "learning_rate": 1e-2},
    "ptuning": {"pre_seq_len": 8, "prefix_projection": True, "prefix_hidden_size": 32, "learning_rate": 1e-2},
}
# (column title, DeepSpeed config, extra training flags). No ZeRO-1 column: DeepSpeed runs ZeRO-1 with ZeRO-2's
# optimizer (stage_1_and_2.py, gradients not partitioned); ZeRO-1 is checked against one process in
# test_zero_equivalence and under fp16 in test_fp16, and a column of it cost CI a minute for no other line.
CONFIGS = [
    ("ZeRO-0", "zero0", {}),
    ("ZeRO-2", "zero2", {}),
    ("ZeRO-3", "zero3", {}),
    ("ZeRO-2 + offload, bf16, GC", "zero2_offload", {"bf16": True, "gradient_checkpointing": True}),
    ("ZeRO-3 + offload, bf16, GC", "zero3_offload", {"bf16": True, "gradient_checkpointing": True}),
]
STEPS = 4
RESULTS: dict[tuple[str, str], str] = {}
START, END = "<!-- compat-table:start -->", "<!-- compat-table:end -->"


GENERATED_TOKENS = 4


def eval_examples(model_dir, eval_path):
    cfg = load_config(
        [f"--model_name_or_path={model_dir}", f"--dataset={eval_path}", "--output_dir=x", "--cutoff_len=96"]
    )
    tokenizer = load_tokenizer(str(model_dir))
    examples, _ = tokenize_dataset(str(eval_path), tokenizer, str(model_dir), "glm4", cfg.data, 0, lambda *_: None)
    return tokenizer, examples


def eval_loss_of(model, model_dir, eval_path) -> float:
    """Mean loss per trainable token on the eval set: the same quantity the trainer logs as eval/loss."""
    tokenizer, examples = eval_examples(model_dir, eval_path)
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        # The plain full-logits computation: independent of the trainer's chunked head path.
        s = plain_token_loss_sum(model(**model_inputs(batch)).logits.float(), batch["labels"])
    return float(s) / count_trainable_tokens(batch["labels"])


def greedy_replies(model, model_dir, eval_path) -> list[str]:
    """Each eval prompt alone (no padding), greedy, as the trainer's predict decodes it."""
    tokenizer, examples = eval_examples(model_dir, eval_path)
    eos = generation_eos_ids_of(model, tokenizer)
    out = []
    for e in examples:
        ids = torch.tensor([e.prompt_ids])
        with torch.no_grad():
            row = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=GENERATED_TOKENS,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )[0, ids.shape[1] :].tolist()
        cut = next((j for j, t in enumerate(row) if t in eos), len(row))
        out.append(tokenizer.decode(row[:cut], skip_special_tokens=True).removeprefix("\n"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("column,ds_config,extra", CONFIGS, ids=[c[1] for c in CONFIGS])
@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_and_reloads(tmp_path, varlen_data, pretrained_tiny, eval_data, method, column, ds_config, extra):
    out = tmp_path / "out"
    args = base_args(
        out,
        varlen_data,
        model_name_or_path=pretrained_tiny,
        train_from_scratch=False,
        finetuning_type=method,
        eval_dataset=eval_data,
        max_steps=STEPS,
        per_device_train_batch_size=2,
        deepspeed=f"ds_configs/{ds_config}.json",
        predict_with_generate=True,
        generation_max_new_tokens=GENERATED_TOKENS,
        per_device_eval_batch_size=1,  # no padding: batched greedy equals one-by-one greedy exactly
        **{**METHODS[method], **extra},
    )
    run_train(args, nprocs=2)

    # Each outcome is recorded as measured before anything is asserted, so the README cell says what
    # happened (a cell whose reload differs reads "reload differs", and the table test then fails too).
    losses = read_metrics(out, "train/loss")
    steps_ok = sorted(losses) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in losses.values())
    trains = steps_ok and losses[STEPS] < losses[1]
    results = json.loads((out / "all_results.json").read_text())
    trained = [json.loads(line)["prediction"] for line in open(out / "generated_predictions.jsonl")]
    evaluates = "eval/loss" in results and len(trained) > 0
    model = load_for_inference(str(out), dtype=torch.bfloat16 if extra.get("bf16") else torch.float32)
    # bf16 weights and 4-bit re-quantization agree with the trainer's own forward to bf16 round-off.
    tol = 2e-2 if extra.get("bf16") else 1e-4
    reloaded = eval_loss_of(model, out, eval_data)
    reloads = abs(reloaded - results.get("eval/loss", math.inf)) < tol * max(1.0, results.get("eval/loss", 1.0))
    replies = greedy_replies(model, out, eval_data)
    cell = [
        "trains" if trains else "loss does not fall",
        "evaluates" if evaluates else "no eval",
        "reloads" if reloads else "reload differs",
    ]
    if extra.get("bf16"):  # bf16 round-off may flip a near-tie between two tokens: replies are not compared
        cell[-1] += " (bf16)"
    else:
        cell.append("same replies" if replies == trained else "other replies")
    RESULTS[(method, column)] = ", ".join(cell)

    assert steps_ok and trains, losses
    assert evaluates and len(trained) == len(replies), results
    assert reloads, (reloaded, results["eval/loss"])
    if not extra.get("bf16"):
        assert replies == trained


def render_table() -> str:
    header = "| method | " + " | ".join(c[0] for c in CONFIGS) + " |"
    lines = [header, "|" + "---|" * (len(CONFIGS) + 1)]
    for method in METHODS:
        lines.append(f"| {method} | " + " | ".join(RESULTS[(method, c[0])] for c in CONFIGS) + " |")
    return "\n".join(lines)


def readme_cells(text: str) -> dict[tuple[str, str], str]:
    block = re.search(re.escape(START) + "(.*?)" + re.escape(END), text, re.S)
    assert block, f"README.md lacks the {START} ... {END} markers"
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.group(1).strip().splitlines()]
    columns = rows[0][1:]
    return {(row[0], column): cell for row in rows[2:] for column, cell in zip(columns, row[1:], strict=True)}


def test_readme_table_is_what_the_matrix_measured():
    # Every cell that ran in this session is compared with the README's (a -k selection checks its cells);
    # a cell says what was measured, so a failed reload would read "reload differs" there.
    ran = dict(RESULTS)
    if not ran:
        pytest.skip("no matrix cell ran in this session (deselected with -k/-m)")
    readme = REPO / "README.md"
    text = readme.read_text(encoding="utf-8")
    if os.environ.get("DIST_GLM_WRITE_COMPAT") == "1" and len(ran) == len(METHODS) * len(CONFIGS):
        current = re.search(re.escape(START) + ".*?" + re.escape(END), text, re.S)
        text = text.replace(current.group(0), f"{START}\n{render_table()}\n{END}")
        readme.write_text(text, encoding="utf-8")
    shown = readme_cells(text)
    differ = {key: (shown.get(key), cell) for key, cell in ran.items() if shown.get(key) != cell}
    assert not differ, (
        f"README's compatibility table differs from what the matrix measured (README, measured): {differ}; "
        "regenerate it with DIST_GLM_WRITE_COMPAT=1 .venv/bin/python -m pytest tests/test_method_matrix.py"
    )
