"""LLaMA-Factory's own example recipes and demo data (../shared/llamafactory, one LLaMA-Factory commit:
its SOURCES.md), read from there and edited only where a user must edit them: the model path, the
template, dataset_dir, output_dir and a short run. QLoRA in their spelling trains QLoRA, stage pt trains
raw text, and their registry resolves unchanged."""

import json
import os
from pathlib import Path

import pytest
import yaml

from conftest import REPO, read_metrics, run_train
from dist_glm.config import collect_config
from dist_glm.data.converters import load_conversations
from dist_glm.training.checks import validate_inputs

THEIRS = REPO.parent / "shared" / "llamafactory"
pytestmark = pytest.mark.skipif(
    not THEIRS.is_dir() and not os.environ.get("DIST_GLM_REQUIRE_CLUSTER_TESTS"),
    reason="LLaMA-Factory's files are beside the checkout (../shared/llamafactory) in CI and sessions",
)
TINY_0414 = REPO / "assets" / "tiny-glm4-0414"


def their_recipe(tmp_path: Path, name: str, **edits) -> str:
    """examples/<name> with only what a user must change: model, template, dataset_dir, output_dir, length."""
    recipe = yaml.safe_load((THEIRS / "examples" / name).read_text(encoding="utf-8"))
    recipe.update(
        {
            "model_name_or_path": str(TINY_0414),
            "template": "glm4_0414",
            "dataset_dir": str(THEIRS / "data"),
            "output_dir": str(tmp_path / "out"),
            **edits,
        }
    )
    path = tmp_path / Path(name).name
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return str(path)


def test_their_qlora_spelling_trains_qlora(tmp_path):
    notes = []
    cfg, problems = collect_config([their_recipe(tmp_path, "train_qlora/qwen3_lora_sft_bnb_npu.yaml")], notes=notes)
    assert problems == []
    assert cfg.method.finetuning_type == "qlora" and cfg.method.quantization_bit == 4
    assert cfg.method.double_quantization is False  # their double_quantization: false is honoured too
    assert any("finetuning_type=lora with quantization_bit=4 is QLoRA" in n for n in notes), notes


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"finetuning_type": "full"}, "finetuning_type=full does not quantize its base"),
        ({"quantization_bit": None}, "without quantization_bit: QLoRA needs quantization_bit=4"),
        ({"quantization_method": "hqq"}, "quantization_method=hqq is not supported"),
    ],
)
def test_a_quantization_key_no_method_uses_is_an_error(tmp_path, extra, message):
    _, problems = collect_config([their_recipe(tmp_path, "train_qlora/qwen3_lora_sft_bnb_npu.yaml", **extra)])
    assert any(message in p for p in problems), problems


def test_their_pretraining_recipe_trains_raw_text(tmp_path):
    notes = []
    cfg, problems = collect_config([their_recipe(tmp_path, "train_lora/qwen3_lora_pretrain.yaml")], notes=notes)
    cfg.model.train_from_scratch = True  # the tiny model has no weights
    validate_inputs(cfg, 1, problems)
    assert cfg.data.dataset_format == "text" and any("stage=pt" in n for n in notes)
    rows = load_conversations(cfg.data.dataset, cfg.data, [])
    assert len(rows) > 100 and all(r["text"] and not r["messages"] for r in rows)


@pytest.mark.slow
def test_their_qlora_recipe_runs(tmp_path):
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    base = tmp_path / "base"  # QLoRA quantizes pretrained weights: the tiny GLM-4-0414 with (random) ones
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_0414)).save_pretrained(base)
    for f in TINY_0414.iterdir():
        if f.name != "config.json":
            shutil.copy(f, base / f.name)
    recipe = their_recipe(tmp_path, "train_qlora/qwen3_lora_sft_bnb_npu.yaml", max_steps=2, cutoff_len=256)
    args = [recipe, f"--model_name_or_path={base}", "--disable_tqdm", "--bf16=false"]  # no fast bf16 on this CPU
    proc = run_train(args, nprocs=None)
    assert "method=qlora" in proc.stdout, proc.stdout[-2000:]
    assert sorted(read_metrics(tmp_path / "out", "train/loss")) == [2]
    assert (tmp_path / "out" / "adapter_config.json").is_file()


@pytest.mark.parametrize("name", ["glaive_toolcall_zh_demo", "glaive_toolcall_en_demo"])
def test_their_tool_call_demo_data_is_read_whole(tmp_path, name):
    # Rows 198 and 294 of the zh file go human, gpt, observation, gpt: their reader accepts an observation
    # where a user turn would stand, and so does ours now (it once stopped the whole run).
    from dist_glm.data.template import IGNORE_INDEX, build_template
    from dist_glm.models.loading import load_tokenizer

    cfg, problems = collect_config(
        [f"--dataset={name}", f"--dataset_dir={THEIRS / 'data'}", f"--model_name_or_path={TINY_0414}",
         f"--output_dir={tmp_path / 'o'}", "--train_from_scratch"]
    )  # fmt: skip
    validate_inputs(cfg, 1, problems)
    rows = load_conversations(cfg.data.dataset, cfg.data, [])
    assert len(rows) == len(yaml.safe_load((THEIRS / "data" / f"{name}.json").read_text(encoding="utf-8")))
    tok = load_tokenizer(str(TINY_0414))
    template = build_template("glm4_0414", tok)
    odd = [
        r for r in rows if [m["role"] for m in r["messages"]][:4] == ["user", "assistant", "observation", "assistant"]
    ]
    if name.endswith("zh_demo"):
        assert {r["where"].rsplit(":", 1)[1] for r in odd} >= {"198", "294"}
    for row in odd:
        enc = template.encode(row, 4096)
        observation = row["messages"][2]["content"]
        start = tok.decode(enc.input_ids).index(observation)
        trained = tok.decode([t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label != IGNORE_INDEX])
        assert observation not in trained and start > 0  # the tool's result is read, never trained


def their_dpo_data(tmp_path: Path) -> Path:
    """A dataset_dir holding their dataset_info.json as it is and a dpo_en_demo.json in the shape their entry
    declares (sharegpt `conversations` with `chosen` / `rejected` turns): their demo file itself is not in
    ../shared, as a user's copy of it would be."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_bytes((THEIRS / "data" / "dataset_info.json").read_bytes())
    alpaca = yaml.safe_load((THEIRS / "data" / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:16]
    rows = [{"conversations": [{"from": "human", "value": r["instruction"]}],
             "chosen": {"from": "gpt", "value": r["output"]},
             "rejected": {"from": "gpt", "value": alpaca[(i + 1) % len(alpaca)]["output"]}}
            for i, r in enumerate(alpaca)]  # fmt: skip
    (data / "dpo_en_demo.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return data


def test_their_dpo_recipe_reads_as_dpo(tmp_path):
    notes = []
    recipe = their_recipe(tmp_path, "train_lora/qwen3_lora_dpo.yaml", dataset_dir=str(their_dpo_data(tmp_path)))
    cfg, problems = collect_config([recipe], notes=notes)
    assert problems == [], problems
    p = cfg.preference
    assert (p.stage, p.pref_loss, p.pref_beta, cfg.method.finetuning_type) == ("dpo", "sigmoid", 0.1, "lora")


@pytest.mark.slow
def test_their_dpo_recipe_runs(tmp_path):
    """examples/train_lora/qwen3_lora_dpo.yaml with the edits a user makes (model, template, dataset_dir,
    output_dir) and a short run: LoRA DPO on their ranking entry, the adapter-off reference."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    base = tmp_path / "base"  # DPO continues a trained model: the tiny GLM-4-0414 with (random) weights
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_0414)).save_pretrained(base)
    for f in TINY_0414.iterdir():
        if f.name != "config.json":
            shutil.copy(f, base / f.name)
    recipe = their_recipe(tmp_path, "train_lora/qwen3_lora_dpo.yaml", dataset_dir=str(their_dpo_data(tmp_path)),
                          model_name_or_path=str(base), max_steps=2, logging_steps=1, cutoff_len=256)  # fmt: skip
    proc = run_train([recipe, "--disable_tqdm", "--bf16=false"], nprocs=None)  # no fast bf16 on this CPU
    assert "preference pairs: 16" in proc.stdout and "adapter switched off" in proc.stdout, proc.stdout[-2000:]
    loss = read_metrics(tmp_path / "out", "train/loss")
    assert sorted(loss) == [1, 2] and loss[1] == pytest.approx(
        0.6931472, abs=1e-5
    )  # ln 2: the policy starts at its reference
    assert (tmp_path / "out" / "adapter_config.json").is_file()
