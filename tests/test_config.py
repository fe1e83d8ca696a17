"""Config parsing and validation: precedence, types, did-you-mean, and every shipped file loads."""

import json
from pathlib import Path

import pytest

from dist_glm.config import DEMO_CONFIG, TRAIN, load_config
from dist_glm.errors import UserError
from dist_glm.options import help_text
from dist_glm.runtime.deepspeed_config import build_ds_config

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = REPO / "assets" / "tiny-glm4"
REQUIRED = ["--model_name_or_path=m", "--dataset=d.jsonl", "--output_dir=o"]


def test_cli_overrides_yaml_overrides_defaults(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model_name_or_path: m\ndataset: d.jsonl\noutput_dir: o\nlearning_rate: 2e-4\nmax_steps: 5\n")
    cfg = load_config([str(y), "--max_steps=7", "--bf16", "--local_rank=1"])
    assert cfg.train.learning_rate == 2e-4  # YAML 1.1 reads 2e-4 as a string; it is converted
    assert cfg.train.max_steps == 7 and cfg.train.bf16 is True
    assert cfg.train.weight_decay == 0.0  # default untouched
    cfg = load_config([str(y), "--learning_rate", "1e-5"])  # the space-separated form works too
    assert cfg.train.learning_rate == 1e-5


def test_no_arguments_runs_the_demo_but_flags_alone_do_not():
    assert load_config([]).model.train_from_scratch is True
    assert load_config(["--local_rank=0"]).model.model_name_or_path == "assets/tiny-glm4"
    assert load_config(REQUIRED).model.train_from_scratch is False


@pytest.mark.parametrize(
    "argv,match",
    [
        (REQUIRED + ["--learning_rat=1e-4"], r"unknown key 'learning_rat'; did you mean 'learning_rate'\?"),
        (REQUIRED + ["--bf16=maybe"], r"bf16='maybe' is not a boolean"),
        (REQUIRED + ["--max_steps=1.5"], r"max_steps='1.5' is not an integer"),
        (REQUIRED + ["--finetuning_type=ptuningv3"], r"finetuning_type='ptuningv3' is not supported; use one of"),
        (REQUIRED + ["--per_device_train_batch_size=0"], r"per_device_train_batch_size=0 must be at least 1"),
        (REQUIRED + ["--early_stopping_patience=2"], r"early_stopping_patience needs eval_dataset"),
        (REQUIRED + ["--metric_for_best_model=acc"], r"metric_for_best_model='acc' is not supported; use one of loss"),
        (REQUIRED + ["--metric_for_best_model=bleu-4"], r"is a generation metric; set predict_with_generate=true"),
        (REQUIRED + ["--preflight_timeout=0"], r"preflight_timeout=0 must be at least 1"),
        (["--dataset=d.jsonl"], r"model_name_or_path is required"),
        (REQUIRED + ["extra.yaml", "again.yaml"], r"unexpected argument 'again.yaml'"),
    ],
)
def test_bad_values_are_reported(argv, match):
    with pytest.raises(UserError, match=match):
        load_config(argv)


def test_all_problems_are_reported_together():
    with pytest.raises(UserError) as e:
        load_config(REQUIRED + ["--lerning_rate=1", "--warmup_ratio=2", "--lora_rank=0"])
    assert len(e.value.problems) == 3


def test_unreadable_yaml_names_file_and_line(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("model_name_or_path: m\nlist: [1,\n  oops\n")
    with pytest.raises(UserError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config([str(y)])
    y.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_config([str(y)])


def saved_tiny(path: Path) -> Path:
    """The tiny GLM with (random) weights on disk: what a teacher directory looks like."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_MODEL)).save_pretrained(path)
    for f in TINY_MODEL.iterdir():
        if f.name != "config.json":
            (path / f.name).write_bytes(f.read_bytes())
    return path


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates_fully(path, tmp_path):
    """Every value, the DeepSpeed config it names (on 8 ranks) and its method's own checks; only the
    paths it points at (a user's checkpoint and data) are swapped for shipped ones of the same shape."""
    from dist_glm.training.checks import validate_inputs

    cfg = load_config([str(path)])
    assert cfg.model.model_name_or_path and cfg.data.dataset and cfg.train.output_dir
    if not Path(cfg.model.model_name_or_path).is_dir():
        cfg.model.model_name_or_path, cfg.model.train_from_scratch = str(TINY_MODEL), True
    demo = REPO / "data" / "advertisegen_demo"
    files = cfg.data.dataset.split(",")  # each file swapped on its own: mix_probs counts them
    cfg.data.dataset = ",".join(f if Path(f).is_file() else str(demo / "train.jsonl") for f in files)
    if cfg.data.eval_dataset and not Path(cfg.data.eval_dataset).is_file():
        cfg.data.eval_dataset = str(demo / "dev.jsonl")
    if cfg.distill.teacher_model_name_or_path and not Path(cfg.distill.teacher_model_name_or_path).is_dir():
        cfg.distill.teacher_model_name_or_path = str(saved_tiny(tmp_path / "teacher"))
    if cfg.model.adapter_name_or_path and not Path(cfg.model.adapter_name_or_path).is_dir():
        adapter = tmp_path / "adapter"  # a LoRA result's adapter_config.json, as PEFT writes it
        adapter.mkdir()
        peft = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ["q_proj"]}
        (adapter / "adapter_config.json").write_text(json.dumps(peft))
        cfg.model.adapter_name_or_path = str(adapter)
    cfg.train.output_dir = str(tmp_path / "out")
    inputs = validate_inputs(cfg, world_size=8)
    assert inputs.ds_config["train_batch_size"] == cfg.train.global_batch_size(8)


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_ds_config_fills_its_autos(path):
    cfg = load_config(
        REQUIRED
        + [f"--deepspeed={path}", "--per_device_train_batch_size=2", "--gradient_accumulation_steps=3", "--bf16"]
    )
    ds = build_ds_config(cfg.train, world_size=4)
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert "auto" not in str(ds)


def test_ds_config_contradictions_are_errors(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text(
        '{"train_micro_batch_size_per_gpu": 8, "bf16": {"enabled": true}, '
        '"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 5}}'
    )
    cfg = load_config(REQUIRED + [f"--deepspeed={bad}"])
    with pytest.raises(UserError) as e:
        build_ds_config(cfg.train, world_size=1)
    text = str(e.value)
    for needle in (
        "train_micro_batch_size_per_gpu=8 contradicts",
        "bf16.enabled=True contradicts",
        "remove the 'optimizer' section",
        "stage=5 is not one of",
    ):
        assert needle in text


def test_help_lists_every_field_with_its_doc():
    text = help_text(TRAIN)
    assert "--learning_rate=5e-05" in text and "Peak learning rate." in text
    assert str(DEMO_CONFIG.name) in text


def test_value_and_file_problems_are_reported_together(tmp_path):
    """A bad value and a missing --deepspeed file (and a missing model and dataset) in one error."""
    from dist_glm.config import collect_config
    from dist_glm.training.checks import validate_inputs

    argv = [
        "--model_name_or_path=/no/such/model",
        "--dataset=missing.jsonl",
        f"--output_dir={tmp_path}",
        "--learning_rate=-1",
        "--deepspeed=missing.json",
    ]
    cfg, problems = collect_config(argv)
    with pytest.raises(UserError) as err:
        validate_inputs(cfg, 1, problems)
    text = "\n".join(err.value.problems)
    for expected in (
        "learning_rate=-1.0 must be positive",
        "deepspeed='missing.json': file not found",
        "/no/such/model",
    ):
        assert expected in text, text
    assert "missing.jsonl" in text


def test_every_tool_reads_values_the_way_training_does(tmp_path):
    """One converter: the same recipe means the same to train.py and evaluate.py; a bare boolean flag
    means true for every command."""
    from dist_glm.config import load_command
    from dist_glm.tools.chat import CHAT
    from dist_glm.tools.evaluate import EVALUATE

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: m\ndataset: d.jsonl\noutput_dir: o\ncutoff_len: 64.0\nmax_steps: 5\n")
    assert load_config([str(recipe)]).data.cutoff_len == 64
    assert load_command([str(recipe)], EVALUATE)["data"].cutoff_len == 64
    recipe.write_text("eval_dataset: e.jsonl\nmask_history: 1\n")
    for parse in (
        lambda: load_config([str(recipe), "--model_name_or_path=m", "--dataset=d", "--output_dir=o"]),
        lambda: load_command([str(recipe)], EVALUATE),
    ):
        with pytest.raises(UserError, match=r"mask_history=1 is not a boolean"):
            parse()
    chat = load_command(["--model_name_or_path=m", "--do_sample", "--temperature=0.8"], CHAT)["chat"]
    assert chat.do_sample is True and chat.temperature == 0.8
    with pytest.raises(UserError, match=r"max_new_tokens='3.5' is not an integer"):
        load_command(["--max_new_tokens=3.5"], CHAT)
    with pytest.raises(UserError, match=r"unknown key 'eval_datset'; did you mean 'eval_dataset'"):
        load_command(["--eval_datset=x"], EVALUATE)
    # A training recipe's own keys are ignored by a tool reading it; a typo there is still an error.
    recipe.write_text("learning_rate: 1e-4\nlerning_rate: 1e-4\n")
    with pytest.raises(UserError, match=r"r.yaml: unknown key 'lerning_rate'") as err:
        load_command([str(recipe)], EVALUATE)
    assert len(err.value.problems) == 1


def test_help_has_one_format_for_every_command():
    from dist_glm.config import TRAIN
    from dist_glm.tools.chat import CHAT
    from dist_glm.tools.evaluate import EVALUATE
    from dist_glm.tools.export import EXPORT
    from dist_glm.tools.serve import SERVE

    for command in (TRAIN, EVALUATE, CHAT, EXPORT, SERVE):
        text = help_text(command)
        assert text.startswith(f"usage: {command.prog}"), text[:80]
        assert "\n  --model_name_or_path=" in text
    assert "One of: full, freeze, lora, qlora, ptuning." in help_text(TRAIN)
    assert "One of: auto, float32, bfloat16, float16." in help_text(SERVE)


def test_output_dir_that_is_or_sits_under_a_file(tmp_path):
    from dist_glm.training.checks import check_output_dir

    (tmp_path / "f").write_text("")
    assert check_output_dir(str(tmp_path / "f")) == [
        f"output_dir='{tmp_path / 'f'}' is a file; choose a directory for checkpoints and the final model"
    ]
    assert check_output_dir(str(tmp_path / "f" / "run")) == [
        f"output_dir='{tmp_path / 'f' / 'run'}': '{tmp_path / 'f'}' is a file, so the directory cannot be created there"
    ]
    assert check_output_dir(str(tmp_path / "new" / "run")) == []


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--metric_for_best_model=accuracy", "metric_for_best_model='accuracy' is not supported; use one of loss"),
        ("--on_invalid=ignore", "on_invalid='ignore' is not supported; use one of error, skip"),
        ("--template=glm5", "template='glm5' is not supported; use one of auto, glm4"),
    ],
)
def test_a_bad_choice_gives_exactly_one_message(flag, message):
    with pytest.raises(UserError) as err:
        load_config(REQUIRED + [flag])
    assert len(err.value.problems) == 1 and message in err.value.problems[0], err.value.problems


def test_template_choices_are_the_templates_that_exist():
    import typing

    from dist_glm.config import DataConfig
    from dist_glm.data.template import TEMPLATES

    assert typing.get_args(DataConfig.__dataclass_fields__["template"].type) == TEMPLATES


def test_a_template_for_another_tokenizer_is_a_user_error():
    from dist_glm.data.template import build_template
    from dist_glm.models.loading import load_tokenizer

    tok = load_tokenizer(str(TINY_MODEL))
    conversation = {
        "system": "",
        "tools": None,
        "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    }
    with pytest.raises(UserError, match=r"template: this tokenizer lacks the special tokens \['sop'\].*template=auto"):
        build_template("chatglm3", tok).encode(conversation, 64)
