"""Training configuration: typed sections, loaded from YAML and overridden by `--key=value` flags.

Users see flat names that follow Hugging Face TrainingArguments (`--learning_rate=2e-4`); inside, the
fields are grouped into typed sections so each module receives only what it needs. Precedence is
defaults < YAML file < command line. Unknown keys and bad values are collected and reported together
(with a did-you-mean) before any process group starts; `validate()` checks the files they point to.
"""

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dist_glm.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"

FINETUNING_TYPES = ("full", "freeze", "lora", "qlora", "ptuning")
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
DATASET_FORMATS = ("auto", "alpaca", "sharegpt", "openai", "advertisegen", "chatglm3")
TEMPLATES = ("auto", "glm4", "chatglm3", "chatglm2", "chatglm")
ON_INVALID = ("error", "skip")
EVAL_METRICS = ("loss", "perplexity", "rouge-1", "rouge-2", "rouge-l", "bleu-4", "exact_match")
LOWER_IS_BETTER = ("loss", "perplexity")


def _f(default, help: str, **kw):
    """A dataclass field whose help text becomes `--help` output."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    model_name_or_path: str = _f("", "Local directory of a GLM checkpoint (config.json + weights + tokenizer).")
    train_from_scratch: bool = _f(False, "Initialise weights randomly from the checkpoint's config (seeded).")
    trust_remote_code: bool = _f(False, "Allow the checkpoint's own modelling code (ChatGLM-6B/2/3).")


@dataclass
class DataConfig:
    dataset: str = _f("", "Training data: comma-separated local json/jsonl/csv/parquet files.")
    eval_dataset: str = _f("", "Held-out data for eval loss and generation metrics (comma-separated).")
    dataset_format: str = _f("auto", f"Row format: one of {', '.join(DATASET_FORMATS)}.")
    prompt_column: str = _f("content", "AdvertiseGen prompt column.")
    response_column: str = _f("summary", "AdvertiseGen response column.")
    template: str = _f("auto", f"Chat template: one of {', '.join(TEMPLATES)} (auto: from the model type).")
    cutoff_len: int = _f(1024, "Maximum tokens per sample; the response keeps at least half.")
    packing: bool = _f(False, "Pack several samples into each row of cutoff_len tokens (attention stays per sample).")
    mask_history: bool = _f(False, "Train on the last assistant turn only (default: every assistant turn).")
    train_on_prompt: bool = _f(False, "Also train on prompt tokens (system, user, observation).")
    on_invalid: str = _f("error", "Bad data rows: 'error' stops with file:line; 'skip' skips and reports them.")
    max_samples: int = _f(0, "Use only the first N training rows (0 = all).")
    data_cache_dir: str = _f(
        "", "Tokenized-data cache, shared by all nodes (default: .dist_glm_cache/ beside the first dataset file)."
    )


@dataclass
class MethodConfig:
    finetuning_type: str = _f("lora", f"Tuning method: one of {', '.join(FINETUNING_TYPES)}.")
    lora_rank: int = _f(8, "LoRA rank r.")
    lora_alpha: float = _f(16.0, "LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input.")
    lora_target: str = _f("all-linear", "Comma-separated module names to adapt, or 'all-linear'.")
    use_rslora: bool = _f(False, "Rank-stabilised LoRA: scale by alpha / sqrt(r).")
    use_dora: bool = _f(False, "DoRA: weight-decomposed low-rank adaptation.")
    lora_modules_to_save: str = _f("", "Modules trained in full next to LoRA, e.g. 'embed_tokens,lm_head'.")
    freeze_trainable_layers: int = _f(2, "freeze: train the last N decoder layers (negative: the first N).")
    freeze_trainable_modules: str = _f(
        "all", "freeze: inside those layers train only these modules (comma-separated, e.g. 'mlp,self_attn'), or 'all'."
    )
    freeze_extra_modules: str = _f("", "freeze: also train these modules, e.g. 'embed_tokens,lm_head'.")
    quantization_bit: int = _f(4, "qlora: bits of the frozen base weights, 4 or 8 (bitsandbytes).")
    quantization_type: str = _f("nf4", "qlora 4-bit: data type, 'nf4' or 'fp4'.")
    double_quantization: bool = _f(True, "qlora 4-bit: also quantize the quantization constants.")
    pre_seq_len: int = _f(128, "ptuning: number of prefix (virtual) tokens per layer.")
    prefix_projection: bool = _f(False, "ptuning: produce the prefix through a two-layer MLP (P-tuning v2 option).")
    prefix_hidden_size: int = _f(512, "ptuning: hidden size of that MLP.")


@dataclass
class TrainConfig:
    output_dir: str = _f("", "Where checkpoints, logs, metrics and the final model go.")
    overwrite_output_dir: bool = _f(False, "Allow starting fresh in an output_dir that holds checkpoints.")
    deepspeed: str = _f("", "DeepSpeed JSON config (e.g. ds_configs/zero3.json); empty = ZeRO-0.")
    per_device_train_batch_size: int = _f(1, "Micro-batch size per rank.")
    per_device_eval_batch_size: int = _f(8, "Eval micro-batch size per rank.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    learning_rate: float = _f(5e-5, "Peak learning rate.")
    lr_scheduler_type: str = _f("linear", f"One of {', '.join(LR_SCHEDULERS)}.")
    warmup_ratio: float = _f(0.0, "Warmup as a fraction of total steps (used when warmup_steps is 0).")
    warmup_steps: int = _f(0, "Warmup steps (overrides warmup_ratio).")
    num_train_epochs: float = _f(3.0, "Epochs to train (ignored when max_steps > 0).")
    max_steps: int = _f(-1, "Total optimizer steps; -1 = derive from num_train_epochs.")
    weight_decay: float = _f(0.0, "AdamW weight decay (not applied to biases and norms).")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).")
    bf16: bool = _f(False, "Train in bfloat16 with fp32 master weights.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    logging_steps: int = _f(10, "Log train metrics every N steps.")
    save_steps: int = _f(500, "Save a checkpoint every N steps (0 = only at the end).")
    save_total_limit: int = _f(0, "Keep at most N checkpoints, deleting the oldest (0 = keep all).")
    eval_steps: int = _f(0, "Evaluate every N steps (0 = only at the end when eval_dataset is set).")
    eval_on_start: bool = _f(False, "Evaluate once before the first step, as a baseline.")
    predict_with_generate: bool = _f(False, "Also generate on the eval set and report ROUGE/BLEU.")
    generation_max_new_tokens: int = _f(128, "Token budget per generated answer during eval.")
    early_stopping_patience: int = _f(0, "Stop after N evals without a better metric_for_best_model (0 = off).")
    metric_for_best_model: str = _f(
        "loss",
        f"Eval metric early stopping and best_metric follow: one of {', '.join(EVAL_METRICS)} (lower is better "
        "for loss and perplexity, higher for the rest, which need predict_with_generate).",
    )
    seed: int = _f(42, "Seed for init, data order and dropout.")
    resume_from_checkpoint: str = _f("", "Checkpoint directory to resume from, or 'auto' for the latest.")
    disable_tqdm: bool = _f(False, "Turn off the rank-0 progress bar.")
    preflight_timeout: int = _f(
        300, "Seconds for every rank to join at start-up; a rank that cannot is reported with its host, not hung on."
    )
    ddp_timeout: int = _f(1800, "Seconds one collective may wait for the other ranks before the job fails.")

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


# Flat user-facing name -> (section, field). Names are unique across sections by construction.
FIELDS: dict[str, tuple[str, dataclasses.Field]] = {
    f.name: (section, f) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
}
assert len(FIELDS) == sum(len(dataclasses.fields(c)) for c in SECTIONS.values()), "duplicate field name"

# Flags a launcher appends that are not configuration (the deepspeed launcher adds --local_rank=N).
LAUNCHER_FLAGS = {"local_rank"}


def _base_type(tp):
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _convert(name: str, value, source: str):
    """Coerce a YAML or CLI value to the field's type; raise a one-line message on failure."""
    tp = _base_type(FIELDS[name][1].type)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
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


def _unknown_key_message(key: str, source: str) -> str:
    close = difflib.get_close_matches(key, list(FIELDS), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else "; run with --help to list the valid keys"
    return f"{source}: unknown key '{key}'{hint}"


def parse_cli(argv: list[str]) -> tuple[str | None, dict[str, str], list[str]]:
    """Split argv into (yaml_path, {key: raw_value}, problems). Accepts --k=v and --k v."""
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
            if i < len(argv) and not argv[i].startswith("--"):
                value = argv[i]
                i += 1
            elif key in FIELDS and _base_type(FIELDS[key][1].type) is bool:
                value = "true"  # a bare boolean flag switches it on
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


def build_config(values: dict[str, tuple[object, str]]) -> tuple[Config, list[str]]:
    """A Config from {key: (value, source)} and every problem found (a value that does not convert keeps
    its default and is reported)."""
    cfg, problems = Config(), []
    for key, (value, source) in values.items():
        if key not in FIELDS:
            problems.append(_unknown_key_message(key, source))
            continue
        try:
            section, f = FIELDS[key]
            setattr(getattr(cfg, section), key, _convert(key, value, source))
        except ValueError as e:
            problems.append(str(e))
    return cfg, problems + check_values(cfg)


def collect_config(argv: list[str], default_yaml: Path | None = DEMO_CONFIG) -> tuple[Config, list[str]]:
    """Defaults < YAML < CLI, and the problems found, without raising: a caller that checks files next
    (training) reports everything together. With no arguments at all the embedded demo recipe runs;
    flags without a YAML start from the defaults (never from the demo, whose settings would leak into a
    real run)."""
    yaml_path, overrides, problems = parse_cli(argv)
    if problems:
        raise UserError(problems)
    if yaml_path is None and not overrides and default_yaml is not None:
        yaml_path = str(default_yaml)
    values: dict[str, tuple[object, str]] = {}
    if yaml_path is not None:
        values.update({k: (v, yaml_path) for k, v in load_yaml(yaml_path).items()})
    values.update({k: (v, "command line") for k, v in overrides.items()})
    return build_config(values)


def load_config(argv: list[str], default_yaml: Path | None = DEMO_CONFIG) -> Config:
    """`collect_config` that raises one UserError with every problem."""
    cfg, problems = collect_config(argv, default_yaml)
    if problems:
        raise UserError(problems)
    return cfg


def check_values(cfg: Config) -> list[str]:
    """Checks on values alone (no file system); every problem names the key and the fix."""
    m, d, t, me = cfg.model, cfg.data, cfg.train, cfg.method
    out = []

    def need(ok: bool, msg: str):
        if not ok:
            out.append(msg)

    need(bool(m.model_name_or_path), "model_name_or_path is required; set it to a local GLM checkpoint directory")
    need(bool(d.dataset), "dataset is required; set it to one or more comma-separated jsonl/json files")
    need(bool(t.output_dir), "output_dir is required; set it to a directory for checkpoints and the final model")
    need(
        me.finetuning_type in FINETUNING_TYPES,
        f"finetuning_type={me.finetuning_type!r} is not supported; use one of {', '.join(FINETUNING_TYPES)}",
    )
    need(
        d.dataset_format in DATASET_FORMATS,
        f"dataset_format={d.dataset_format!r} is not supported; use one of {', '.join(DATASET_FORMATS)}",
    )
    need(
        t.lr_scheduler_type in LR_SCHEDULERS,
        f"lr_scheduler_type={t.lr_scheduler_type!r} is not supported; use one of {', '.join(LR_SCHEDULERS)}",
    )
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
    need(me.lora_rank >= 1, f"lora_rank={me.lora_rank} must be at least 1")
    need(0 <= me.lora_dropout < 1, f"lora_dropout={me.lora_dropout} must be in [0, 1)")
    need(me.quantization_bit in (4, 8), f"quantization_bit={me.quantization_bit} is not supported; use 4 or 8")
    need(me.quantization_type in ("nf4", "fp4"), f"quantization_type={me.quantization_type!r}: use 'nf4' or 'fp4'")
    need(me.pre_seq_len >= 1, f"pre_seq_len={me.pre_seq_len} must be at least 1")
    need(me.prefix_hidden_size >= 1, f"prefix_hidden_size={me.prefix_hidden_size} must be at least 1")
    need(
        not (t.early_stopping_patience and not d.eval_dataset),
        "early_stopping_patience needs eval_dataset; set eval_dataset or remove early_stopping_patience",
    )
    need(not (t.eval_steps and not d.eval_dataset), "eval_steps needs eval_dataset; set eval_dataset")
    need(
        t.metric_for_best_model in EVAL_METRICS,
        f"metric_for_best_model={t.metric_for_best_model!r} is not an eval metric; use one of "
        + ", ".join(EVAL_METRICS),
    )
    need(
        t.metric_for_best_model in LOWER_IS_BETTER or t.predict_with_generate,
        f"metric_for_best_model={t.metric_for_best_model!r} is a generation metric; set predict_with_generate=true",
    )
    need(
        not (t.predict_with_generate and not d.eval_dataset),
        "predict_with_generate needs eval_dataset; set eval_dataset",
    )
    return out


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_flat_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")


def help_text() -> str:
    lines = [
        "usage: train.py [CONFIG.yaml] [--key=value ...]",
        "",
        f"With no arguments at all the demo recipe {DEMO_CONFIG.relative_to(REPO_ROOT)} is used.",
        "",
    ]
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  --{f.name}={json.dumps(default)}\n      {f.metadata['help']}")
    return "\n".join(lines)
