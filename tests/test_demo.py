"""The README's demo command runs to completion and writes everything the README promises."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, child_env, read_metrics

OUT = REPO / "out" / "demo"


@pytest.mark.slow
def test_readme_demo_command_learns_and_writes_its_outputs():
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    proc = subprocess.run(
        [deepspeed, "launch/train.py"], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for name in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "config.yaml",
        "metrics.jsonl",
        "all_results.json",
        "generated_predictions.jsonl",
    ):
        assert (OUT / name).is_file(), name
    # save_total_limit=2 kept the two newest complete checkpoints.
    assert sorted(p.name for p in OUT.glob("checkpoint-*")) == ["checkpoint-400", "checkpoint-600"]

    eval_loss, rouge_l = read_metrics(OUT, "eval/loss"), read_metrics(OUT, "eval/rouge-l")
    assert sorted(eval_loss) == [0, 200, 400, 600]
    assert eval_loss[600] < eval_loss[0] / 10, eval_loss
    assert rouge_l[600] > rouge_l[0] + 50, rouge_l
    train_keys = {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second", "train/memory_gb"}
    records = [json.loads(ln) for ln in (OUT / "metrics.jsonl").read_text().splitlines()]
    assert train_keys <= set().union(*records)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(OUT / "runs")).Reload()
    assert (train_keys | {"eval/loss", "eval/rouge-l"}) <= set(events.Tags()["scalars"])
    assert len(events.Scalars("train/loss")) == 60  # every logging_steps=10 of 600 steps

    # The exported model is a plain HF model that reproduces a held-out answer.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dist_glm.data.template import build_template
    from dist_glm.models import generation_eos_ids

    model = AutoModelForCausalLM.from_pretrained(OUT).eval()
    tok = AutoTokenizer.from_pretrained(OUT)
    row = json.loads((REPO / "data" / "advertisegen_demo" / "dev.jsonl").read_text(encoding="utf-8").splitlines()[0])
    prompt = torch.tensor(
        [build_template("glm4", tok).encode_prompt({"messages": [{"role": "user", "content": row["content"]}]})]
    )
    out = model.generate(prompt, max_new_tokens=48, do_sample=False, eos_token_id=generation_eos_ids(OUT, tok))
    assert tok.decode(out[0, prompt.shape[1] :], skip_special_tokens=True).strip() == row["summary"]
