"""Recipes pasted from LLaMA-Factory run or fail with a clear message. The YAMLs are written out in the
shape of LLaMA-Factory's own examples (examples/train_lora/*_lora_sft.yaml, train_qlora/, train_full/
and examples/deepspeed/ds_z3_config.json), with GLM-4's names; only the paths point at local files."""

import json

import pytest

from conftest import REPO, TINY_MODEL, read_metrics, run_train
from dist_glm.config import collect_config
from dist_glm.errors import UserError
from dist_glm.training.checks import validate_inputs

DEMO_DATA = REPO / "data" / "advertisegen_demo"

LORA_SFT = """\
### model
model_name_or_path: {model}
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: {data}
template: glm4
cutoff_len: 128
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: {out}
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""
QLORA_EXTRA = "quantization_bit: 4\nquantization_method: bitsandbytes\n"
FULL_EXTRA = "deepspeed: {ds}\n"
# examples/deepspeed/ds_z3_config.json
DS_Z3 = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_allow_untested_optimizer": True,
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True, "sub_group_size": 1e9,
                          "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
                          "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True},
}  # fmt: skip


def recipe(tmp_path, method: str) -> str:
    text = LORA_SFT.format(model=TINY_MODEL, data=DEMO_DATA / "train.jsonl", out=tmp_path / "out")
    if method == "qlora":
        text = text.replace("finetuning_type: lora", "finetuning_type: qlora") + QLORA_EXTRA
    if method == "full":
        (tmp_path / "ds_z3_config.json").write_text(json.dumps(DS_Z3))
        text = text.replace("finetuning_type: lora", "finetuning_type: full") + FULL_EXTRA.format(
            ds=tmp_path / "ds_z3_config.json"
        )
    path = tmp_path / f"glm4_{method}_sft.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_their_recipes_validate_with_one_line_notes(tmp_path, method):
    notes = []
    cfg, problems = collect_config([recipe(tmp_path, method)], notes=notes)
    if method == "qlora":  # the recipe's base is a real pretrained checkpoint; ours is built from scratch
        cfg.model.train_from_scratch = False
    else:
        cfg.model.train_from_scratch = True
    assert (
        cfg.train.plot_loss
        and cfg.method.lora_target == "all"
        and cfg.data.val_size == 0.1
        and cfg.train.resume_from_checkpoint == ""
    )
    if method != "qlora":
        validate_inputs(cfg, world_size=8, problems=problems)
    else:
        assert problems == []
    keys = sorted(n.split(": ", 2)[1].split(" ")[0].split("=")[0] for n in notes)
    assert keys == sorted(["overwrite_cache", "dataloader_num_workers"]), notes  # report_to is ours too
    assert cfg.train.report_to == "none"
    assert all(len(n.splitlines()) == 1 for n in notes)


@pytest.mark.parametrize(
    "line,message",
    [
        ("stage: ppo", "stage"),
        ("report_to: mlflow", "report_to=mlflow: mlflow is not supported; use wandb and/or swanlab"),
        ("eval_strategy: epoch", "eval_strategy=epoch: dist_glm evaluates every eval_steps steps"),
        ("flash_attn: fa2", "flash_attn=fa2: set attn_implementation instead (flash_attention_2 for fa2"),
        ("use_swanlab: true", "use_swanlab=True: set report_to=swanlab"),
        ("swanlab_project: glm", "swanlab_project=glm: rename it tracker_project"),
    ],
)
def test_what_we_do_not_do_is_said(tmp_path, line, message):
    path = tmp_path / "r.yaml"
    path.write_text(f"model_name_or_path: m\ndataset: d.jsonl\noutput_dir: o\n{line}\n")
    _, problems = collect_config([str(path)])
    assert len(problems) == 1 and message in problems[0], problems


def test_their_dataset_names_are_explained(tmp_path):
    cfg, problems = collect_config(["--model_name_or_path=m", "--dataset=identity,alpaca_en_demo", "--output_dir=o"])
    with pytest.raises(UserError) as err:
        validate_inputs(cfg, 1, problems)
    names = [p for p in err.value.problems if "a name in dataset_dir's dataset_info.json" in p]
    assert len(names) == 2


def their_registry(tmp_path):
    """A dataset_dir as LLaMA-Factory ships it: dataset_info.json naming an alpaca file with renamed
    columns, a sharegpt file with OpenAI-style tags, a folder, and entries we cannot serve."""
    d = tmp_path / "data"
    (d / "shards").mkdir(parents=True)
    (d / "zh_demo.json").write_text(
        json.dumps([{"q": "你好", "a": "你好！", "sys": "你是助手"}, {"q": "1+1", "a": "2"}], ensure_ascii=False)
    )
    chat = {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}
    (d / "chat.jsonl").write_text(json.dumps(chat, ensure_ascii=False) + "\n")
    for i in range(2):
        (d / "shards" / f"part{i}.jsonl").write_text(json.dumps({"instruction": f"第{i}", "output": "好"}) + "\n")
    registry = {
        "zh_demo": {"file_name": "zh_demo.json", "columns": {"prompt": "q", "response": "a", "system": "sys"}},
        "chat_demo": {
            "file_name": "chat.jsonl",
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        },
        "sharded": {"file_name": "shards"},
        "from_hub": {"hf_hub_url": "llamafactory/alpaca_en"},
        "dpo_demo": {"file_name": "zh_demo.json", "ranking": True},
    }
    (d / "dataset_info.json").write_text(json.dumps(registry, ensure_ascii=False))
    return d


def test_their_registry_works_unchanged(tmp_path):
    from dist_glm.data.batching import build_examples
    from dist_glm.data.converters import load_conversations
    from dist_glm.models.loading import load_tokenizer

    d = their_registry(tmp_path)
    cfg, problems = collect_config(
        ["--model_name_or_path=assets/tiny-glm4", "--train_from_scratch", "--dataset=zh_demo,chat_demo,sharded",
         f"--dataset_dir={d}", f"--eval_dataset=dev={d / 'shards'}", f"--output_dir={tmp_path / 'o'}"]
    )  # fmt: skip
    validate_inputs(cfg, 1, problems)  # resolves the names, folders and patterns into files
    assert cfg.data.dataset.split(",") == [str(d / "zh_demo.json"), str(d / "chat.jsonl")] + [
        str(d / "shards" / f"part{i}.jsonl") for i in range(2)
    ]
    assert cfg.data.eval_dataset == ",".join(f"dev={d / 'shards' / f'part{i}.jsonl'}" for i in range(2))
    convs = load_conversations(cfg.data.dataset, cfg.data, [])
    assert convs[0]["system"] == "你是助手" and convs[0]["messages"][0] == {"role": "user", "content": "你好"}
    assert convs[2]["messages"] == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    _, stats = build_examples(cfg.data.dataset, load_tokenizer("assets/tiny-glm4"), cfg.data, "glm4")
    line = stats.summary("dataset")  # one part per file, with its detected format
    assert "zh_demo.json (alpaca): 2 rows -> 2 samples" in line and "chat.jsonl (sharegpt): 1 rows" in line
    assert "part1.jsonl (alpaca)" in line


@pytest.mark.parametrize(
    "name,message",
    [("from_hub", "is a hf_hub_url entry; nothing is downloaded here"), ("dpo_demo", "train it with stage: dpo")],
)
def test_registry_entries_we_cannot_serve_say_why(tmp_path, name, message):
    d = their_registry(tmp_path)
    cfg, problems = collect_config(
        ["--model_name_or_path=assets/tiny-glm4", "--train_from_scratch", f"--dataset={name}", f"--dataset_dir={d}",
         f"--output_dir={tmp_path / 'o'}"]
    )  # fmt: skip
    with pytest.raises(UserError) as err:
        validate_inputs(cfg, 1, problems)
    assert any(message in p for p in err.value.problems), err.value.problems


def test_globs_and_folders_of_files(tmp_path):
    from dist_glm.data.registry import expand

    d = their_registry(tmp_path)
    files, _ = expand(f"{d}/shards/*.jsonl,{d / 'shards'}", "", "dataset")
    assert files.split(",") == [str(d / "shards" / f"part{i}.jsonl") for i in (0, 1)] * 2
    with pytest.raises(UserError, match="matches no data files"):
        expand(f"{d}/*.csv", "", "dataset")


@pytest.mark.slow
def test_their_lora_recipe_trains(tmp_path):
    args = [recipe(tmp_path, "lora"), "--train_from_scratch", "--max_steps=2", "--bf16=false", "--disable_tqdm"]
    proc = run_train(args, nprocs=None)
    assert "[dist_glm] note: " in proc.stdout and "overwrite_cache is not needed" in proc.stdout
    assert sorted(read_metrics(tmp_path / "out", "eval/loss")) == [2]  # val_size held out the eval set
