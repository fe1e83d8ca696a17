"""Configuration for every command: typed sections, loaded from YAML and overridden by `--key=value`.

Flat names follow Hugging Face TrainingArguments (`--learning_rate=2e-4`), grouped inside into typed
sections so each module receives only what it needs. Training's sections are here; each tool declares
its own next to its code, and all go through the one loader at the bottom: defaults < YAML < command
line, one converter, `Literal[...]` choices checked generically, did-you-mean, every problem in one
error, one `--help` format.
"""

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from dist_glm import llamafactory
from dist_glm.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"

FinetuningType = Literal["full", "freeze", "lora", "qlora", "ptuning"]
EvalMetric = Literal["loss", "perplexity", "rouge-1", "rouge-2", "rouge-l", "bleu-4", "exact_match"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
LOWER_IS_BETTER = ("loss", "perplexity")


def option(default, help: str):
    """A dataclass field whose help text becomes `--help` output."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    model_name_or_path: str = option("", "Local directory of a GLM checkpoint (config.json + weights + tokenizer).")
    train_from_scratch: bool = option(False, "Initialise weights randomly from the checkpoint's config (seeded).")
    trust_remote_code: bool = option(False, "Allow the checkpoint's own modelling code (ChatGLM-6B/2/3).")


@dataclass
class DataConfig:
    dataset: str = option("", "Training data: comma-separated local json/jsonl/csv/parquet files.")
    eval_dataset: str = option("", "Held-out data for eval loss and generation metrics (comma-separated).")
    val_size: float = option(
        0.0,
        "Hold out part of `dataset` for evaluation instead of an eval_dataset: a fraction (< 1) or a count of "
        "samples; chosen from `seed`, the same on every rank, identical samples kept on one side.",
    )
    dataset_format: Literal["auto", "alpaca", "sharegpt", "openai", "advertisegen", "chatglm3"] = option(
        "auto", "Row format (auto: detected per row)."
    )
    prompt_column: str = option("content", "AdvertiseGen prompt column.")
    response_column: str = option("summary", "AdvertiseGen response column.")
    template: Literal["auto", "glm4", "glm4_0414", "chatglm3", "chatglm2", "chatglm"] = option(
        "auto", "Chat template (auto: from the model type)."
    )
    cutoff_len: int = option(1024, "Maximum tokens per sample; the response keeps at least half.")
    packing: bool = option(
        False, "Pack several samples into each row of cutoff_len tokens (attention stays per sample)."
    )
    mask_history: bool = option(False, "Train on the last assistant turn only (default: every assistant turn).")
    train_on_prompt: bool = option(False, "Also train on prompt tokens (system, user, observation).")
    on_invalid: Literal["error", "skip"] = option(
        "error", "Bad data rows: 'error' stops with file:line; 'skip' skips and reports them."
    )
    max_samples: int = option(0, "Use only the first N training rows (0 = all).")
    data_cache_dir: str = option(
        "", "Tokenized-data cache, shared by all nodes (default: .dist_glm_cache/ beside the first dataset file)."
    )


@dataclass
class MethodConfig:
    finetuning_type: FinetuningType = option("lora", "Tuning method.")
    lora_rank: int = option(8, "LoRA rank r.")
    lora_alpha: float = option(16.0, "LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = option(0.0, "Dropout on the LoRA input.")
    lora_target: str = option("all-linear", "Comma-separated module names to adapt, or 'all-linear'.")
    use_rslora: bool = option(False, "Rank-stabilised LoRA: scale by alpha / sqrt(r).")
    use_dora: bool = option(False, "DoRA: weight-decomposed low-rank adaptation.")
    lora_modules_to_save: str = option("", "Modules trained in full next to LoRA, e.g. 'embed_tokens,lm_head'.")
    freeze_trainable_layers: int = option(2, "freeze: train the last N decoder layers (negative: the first N).")
    freeze_trainable_modules: str = option(
        "all", "freeze: inside those layers train only these modules (comma-separated, e.g. 'mlp,self_attn'), or 'all'."
    )
    freeze_extra_modules: str = option("", "freeze: also train these modules, e.g. 'embed_tokens,lm_head'.")
    quantization_bit: Literal[4, 8] = option(4, "qlora: bits of the frozen base weights (bitsandbytes).")
    quantization_type: Literal["nf4", "fp4"] = option("nf4", "qlora 4-bit: data type.")
    double_quantization: bool = option(True, "qlora 4-bit: also quantize the quantization constants.")
    pre_seq_len: int = option(128, "ptuning: number of prefix (virtual) tokens per layer.")
    prefix_projection: bool = option(False, "ptuning: produce the prefix through a two-layer MLP (P-tuning v2 option).")
    prefix_hidden_size: int = option(512, "ptuning: hidden size of that MLP.")


@dataclass
class TrainConfig:
    output_dir: str = option("", "Where checkpoints, logs, metrics and the final model go.")
    overwrite_output_dir: bool = option(False, "Allow starting fresh in an output_dir that holds checkpoints.")
    deepspeed: str = option("", "DeepSpeed JSON config (e.g. ds_configs/zero3.json); empty = ZeRO-0.")
    per_device_train_batch_size: int = option(1, "Micro-batch size per rank.")
    per_device_eval_batch_size: int = option(8, "Eval micro-batch size per rank.")
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.")
    learning_rate: float = option(5e-5, "Peak learning rate.")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = option(
        "linear", "Learning-rate schedule after warmup."
    )
    warmup_ratio: float = option(0.0, "Warmup as a fraction of total steps (used when warmup_steps is 0).")
    warmup_steps: int = option(0, "Warmup steps (overrides warmup_ratio).")
    num_train_epochs: float = option(3.0, "Epochs to train (ignored when max_steps > 0).")
    max_steps: int = option(-1, "Total optimizer steps; -1 = derive from num_train_epochs.")
    weight_decay: float = option(0.0, "AdamW weight decay (not applied to biases and norms).")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    adam_epsilon: float = option(1e-8, "AdamW epsilon.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 = off).")
    bf16: bool = option(False, "Train in bfloat16 with fp32 master weights.")
    gradient_checkpointing: bool = option(False, "Recompute activations in backward to save memory.")
    logging_steps: int = option(10, "Log train metrics every N steps.")
    plot_loss: bool = option(False, "At the end, write training_loss.png and eval_*.png into output_dir.")
    save_steps: int = option(500, "Save a checkpoint every N steps (0 = only at the end).")
    save_total_limit: int = option(0, "Keep at most N checkpoints, deleting the oldest (0 = keep all).")
    eval_steps: int = option(0, "Evaluate every N steps (0 = only at the end when eval_dataset is set).")
    eval_on_start: bool = option(False, "Evaluate once before the first step, as a baseline.")
    predict_with_generate: bool = option(False, "Also generate on the eval set and report ROUGE/BLEU.")
    generation_max_new_tokens: int = option(128, "Token budget per generated answer during eval.")
    early_stopping_patience: int = option(0, "Stop after N evals without a better metric_for_best_model (0 = off).")
    metric_for_best_model: EvalMetric = option(
        "loss",
        "Eval metric early stopping and best_metric follow (lower is better for loss and perplexity, higher "
        "for the rest, which need predict_with_generate).",
    )
    seed: int = option(42, "Seed for init, data order and dropout.")
    resume_from_checkpoint: str = option("", "Checkpoint directory to resume from, or 'auto' for the latest.")
    disable_tqdm: bool = option(False, "Turn off the rank-0 progress bar.")
    preflight_timeout: int = option(
        300, "Seconds for every rank to join at start-up; a rank that cannot is reported with its host, not hung on."
    )
    ddp_timeout: int = option(1800, "Seconds one collective may wait for the other ranks before the job fails.")

    def global_batch_size(self, world_size: int) -> int:
        """Samples per optimizer step over all ranks: the unit every equivalence guarantee is stated in."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * world_size


SECTIONS = {"model": ModelConfig, "data": DataConfig, "method": MethodConfig, "train": TrainConfig}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_flat_dict(self) -> dict:
        return {k: v for section in SECTIONS for k, v in dataclasses.asdict(getattr(self, section)).items()}


def check_values(cfg: Config) -> list[str]:
    """Checks on values alone (no file system); every problem names the key and the fix."""
    m, d, t, me = cfg.model, cfg.data, cfg.train, cfg.method
    has_eval = bool(d.eval_dataset or d.val_size)
    out = []

    def need(ok: bool, msg: str):
        if not ok:
            out.append(msg)

    need(bool(m.model_name_or_path), "model_name_or_path is required; set it to a local GLM checkpoint directory")
    need(bool(d.dataset), "dataset is required; set it to one or more comma-separated jsonl/json files")
    need(bool(t.output_dir), "output_dir is required; set it to a directory for checkpoints and the final model")
    for key in (
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "logging_steps",
        "generation_max_new_tokens",
        "preflight_timeout",
        "ddp_timeout",
    ):
        need(getattr(t, key) >= 1, f"{key}={getattr(t, key)} must be at least 1")
    for key in ("save_steps", "save_total_limit", "eval_steps", "early_stopping_patience", "warmup_steps"):
        need(getattr(t, key) >= 0, f"{key}={getattr(t, key)} must be 0 or more")
    need(t.learning_rate > 0, f"learning_rate={t.learning_rate} must be positive")
    need(0 <= t.warmup_ratio < 1, f"warmup_ratio={t.warmup_ratio} must be in [0, 1)")
    need(t.max_steps == -1 or t.max_steps >= 1, f"max_steps={t.max_steps} must be -1 (use epochs) or at least 1")
    need(t.max_steps >= 1 or t.num_train_epochs > 0, "num_train_epochs must be positive when max_steps is -1")
    need(t.max_grad_norm >= 0, f"max_grad_norm={t.max_grad_norm} must be 0 (off) or positive")
    need(d.cutoff_len >= 8, f"cutoff_len={d.cutoff_len} is too small; use at least 8 tokens")
    need(d.max_samples >= 0, f"max_samples={d.max_samples} must be 0 (all) or positive")
    need(
        d.val_size == 0 or (0 < d.val_size < 1) or (d.val_size >= 1 and d.val_size.is_integer()),
        f"val_size={d.val_size} must be a fraction in (0, 1) or a whole number of samples",
    )
    need(
        not (d.val_size and d.eval_dataset),
        "val_size and eval_dataset are both set; hold out part of dataset (val_size) or use eval_dataset, not both",
    )
    need(me.lora_rank >= 1, f"lora_rank={me.lora_rank} must be at least 1")
    need(0 <= me.lora_dropout < 1, f"lora_dropout={me.lora_dropout} must be in [0, 1)")
    need(me.pre_seq_len >= 1, f"pre_seq_len={me.pre_seq_len} must be at least 1")
    need(me.prefix_hidden_size >= 1, f"prefix_hidden_size={me.prefix_hidden_size} must be at least 1")
    need(
        not (t.early_stopping_patience and not has_eval),
        "early_stopping_patience needs eval_dataset (or val_size); set one or remove early_stopping_patience",
    )
    need(not (t.eval_steps and not has_eval), "eval_steps needs eval_dataset (or val_size); set one")
    need(
        t.metric_for_best_model in LOWER_IS_BETTER or t.predict_with_generate,
        f"metric_for_best_model={t.metric_for_best_model!r} is a generation metric; set predict_with_generate=true",
    )
    need(
        not (t.predict_with_generate and not has_eval),
        "predict_with_generate needs eval_dataset (or val_size); set one",
    )
    return out


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_flat_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")


# ---------------------------------------------------------------- the loader every command uses

# Flags a launcher appends that are not configuration (the deepspeed launcher adds --local_rank=N).
LAUNCHER_FLAGS = {"local_rank"}


@dataclass(frozen=True)
class Command:
    """What one command reads: named sections, each a dataclass and the keys taken from it (None: all)."""

    prog: str
    usage: str
    sections: dict[str, tuple[type, tuple[str, ...] | None]]
    description: str = ""
    # Tools accept a training recipe as their YAML: its keys for other commands are ignored there (a
    # recipe sets many), while on the command line they are errors.
    recipe_for_training: bool = False
    flag_only: tuple[str, ...] = ()  # keys that mean something else in a recipe (its output_dir is training's)
    default_yaml: Path | None = None  # what runs with no arguments at all

    def fields(self) -> dict[str, tuple[str, dataclasses.Field]]:
        """Flat user-facing name -> (section, field); names are unique across a command's sections."""
        out = {}
        for section, (cls, keys) in self.sections.items():
            for f in dataclasses.fields(cls):
                if keys is None or f.name in keys:
                    assert f.name not in out, f"duplicate option {f.name}"
                    out[f.name] = (section, f)
        return out


TRAIN = Command(
    prog="train.py",
    usage="train.py [CONFIG.yaml] [--key=value ...]",
    sections={name: (cls, None) for name, cls in SECTIONS.items()},
    description=f"With no arguments at all the demo recipe {DEMO_CONFIG.relative_to(REPO_ROOT)} is used.",
    default_yaml=DEMO_CONFIG,
)
TRAIN_KEYS = set(TRAIN.fields())


def _optional(tp) -> tuple[object, bool]:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None)), True
    return tp, False


def convert(name: str, tp, value, source: str):
    """A YAML or command-line value as the field's type: bool, int, float, str, a Literal's choices, or one
    of those | None. Raises ValueError with a one-line message naming the key and what is allowed."""
    tp, optional = _optional(tp)
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        value = convert(name, type(choices[0]), value, source)
        if value not in choices:
            listed = ", ".join(str(c) for c in choices)
            raise ValueError(f"{source}: {name}={value!r} is not supported; use one of {listed}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"{source}: {name}={value!r} is not a boolean; use true or false")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{source}: {name}={value!r} is not an integer")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: {name}={value!r} is not an integer") from None
    if tp is float:
        # YAML 1.1 reads `2e-4` (no dot) as a string, so numbers in strings are accepted here.
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: {name}={value!r} is not a number") from None
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _unknown_key_message(key: str, source: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else "; run with --help to list the valid keys"
    return f"{source}: unknown key '{key}'{hint}"


def parse_cli(argv: list[str], command: Command = TRAIN) -> tuple[str | None, dict[str, str], list[str]]:
    """Split argv into (yaml_path, {key: raw_value}, problems). Accepts --k=v, --k v, and a bare --flag
    for a boolean (it means true)."""
    fields = command.fields()
    yaml_path, overrides, problems = None, {}, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            if yaml_path is None:
                yaml_path = arg
            else:
                problems.append(f"command line: unexpected argument '{arg}'; pass options as --key=value")
            continue
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if key in fields and _optional(fields[key][1].type)[0] is bool:
                value = "true"  # a bare boolean flag switches it on
            elif i < len(argv) and not argv[i].startswith("--"):
                value = argv[i]
                i += 1
            elif key not in LAUNCHER_FLAGS:
                problems.append(f"command line: --{key} needs a value; write --{key}=VALUE")
                continue
        if key in LAUNCHER_FLAGS:
            continue
        overrides[key] = value
    return yaml_path, overrides, problems


def load_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file '{path}' not found; pass the path to a YAML recipe such as configs/demo.yaml")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        loc = f":{where.line + 1}" if where else ""
        raise UserError(f"{path}{loc}: not valid YAML ({str(e).splitlines()[0]}); fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of key: value at the top level, got {type(data).__name__}")
    return data


def parse_command(argv: list[str], command: Command, notes: list | None = None) -> tuple[dict[str, object], list[str]]:
    """{section: dataclass instance} and every problem found, without raising (a value that does not
    convert keeps its default and is reported). Defaults < YAML < command line. LLaMA-Factory's own keys
    are understood (dist_glm.llamafactory): harmless ones add a line to `notes`."""
    fields = command.fields()
    yaml_path, overrides, problems = parse_cli(argv, command)
    if problems:
        raise UserError(problems)
    if yaml_path is None and not overrides and command.default_yaml is not None:
        yaml_path = str(command.default_yaml)
    layers = [(load_yaml(yaml_path), yaml_path, False)] if yaml_path else []
    values: dict[str, dict] = {name: {} for name in command.sections}
    for mapping, source, from_cli in layers + [(overrides, "command line", True)]:
        for key, raw in mapping.items():
            if key in fields and (from_cli or key not in command.flag_only):
                section, f = fields[key]
                try:
                    values[section][key] = convert(key, f.type, raw, source)
                except ValueError as e:
                    problems.append(str(e))
            elif (known := llamafactory.check(key, raw)) is not None:
                note, problem = known
                problems += [f"{source}: {problem}"] if problem else []
                if note and notes is not None:
                    notes.append(f"{source}: {note}")
            elif from_cli or not command.recipe_for_training or key not in TRAIN_KEYS:
                if not (key in command.flag_only and not from_cli):
                    problems.append(_unknown_key_message(key, source, fields))
    sections = {name: cls(**values[name]) for name, (cls, _) in command.sections.items()}
    return sections, problems


def load_command(argv: list[str], command: Command) -> dict[str, object]:
    """`parse_command` that raises one UserError with every problem."""
    sections, problems = parse_command(argv, command)
    if problems:
        raise UserError(problems)
    return sections


def collect_config(
    argv: list[str], default_yaml: Path | None = DEMO_CONFIG, notes: list | None = None
) -> tuple[Config, list[str]]:
    """The training Config and every problem (value checks included), without raising: training checks
    the files it names next and reports everything together."""
    command = dataclasses.replace(TRAIN, default_yaml=default_yaml)
    sections, problems = parse_command(argv, command, notes)
    cfg = Config(**sections)
    return cfg, problems + check_values(cfg)


def load_config(argv: list[str], default_yaml: Path | None = DEMO_CONFIG) -> Config:
    """`collect_config` that raises one UserError with every problem."""
    cfg, problems = collect_config(argv, default_yaml)
    if problems:
        raise UserError(problems)
    return cfg


def help_text(command: Command = TRAIN) -> str:
    """`--help` for any command: usage, then every option with its default, meaning and choices."""
    lines = [f"usage: {command.usage}", ""]
    if command.description:
        lines += [command.description, ""]
    for section, (cls, keys) in command.sections.items():
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            if keys is not None and f.name not in keys:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            tp = _optional(f.type)[0]
            choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else ()
            listed = f" One of: {', '.join(str(c) for c in choices)}." if choices else ""
            lines.append(f"  --{f.name}={json.dumps(default)}\n      {f.metadata['help']}{listed}")
    return "\n".join(lines)
