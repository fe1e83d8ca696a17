"""Configuration for every command: typed sections, loaded from YAML and overridden by `--key=value`.

Flat names follow Hugging Face TrainingArguments (`--learning_rate=2e-4`), grouped inside into typed
sections so each module receives only what it needs. Training's sections are here; each tool declares
its own next to its code, and all go through the one loader in dist_glm.options.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from dist_glm.errors import UserError
from dist_glm.options import (  # noqa: F401  (re-exported: every command imports its loader from here)
    Command,
    convert,
    load_command,
    option,
    parse_command,
)
from dist_glm.value_checks import (  # noqa: F401  (re-exported: commands import them from here)
    LOCAL_ONLY,
    LOWER_IS_BETTER,
    TRACKERS,
    check_values,
    mix_probabilities,
    report_to_names,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"

FinetuningType = Literal["full", "freeze", "lora", "qlora", "ptuning"]
EvalMetric = Literal["loss", "perplexity", "rouge-1", "rouge-2", "rouge-l", "bleu-4", "exact_match"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class ModelConfig:
    model_name_or_path: str = option("", "Local directory of a GLM checkpoint (config.json + weights + tokenizer).")
    train_from_scratch: bool = option(False, "Initialise weights randomly from the checkpoint's config (seeded).")
    trust_remote_code: bool = option(
        False,
        "Run the checkpoint's own modelling code: remote-code layouts dist_glm does not translate "
        "(ChatGLM2/3 and glm-4-9b-chat as THUDM published them load without it).",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = option(
        "sdpa", "Attention kernel: sdpa (PyTorch's), eager, or flash_attention_2 (needs flash-attn and a CUDA GPU)."
    )
    experts_implementation: Literal["grouped_mm", "batched_mm", "eager"] = option(
        "grouped_mm", "MoE GLMs: how the routed experts compute (grouped_mm: one grouped matmul; eager: a loop)."
    )
    use_liger_kernel: bool = option(
        False, "Liger-Kernel's RMSNorm and SwiGLU kernels (GLM-4-0414 models; needs liger-kernel and a CUDA GPU)."
    )
    adapter_name_or_path: str = option(
        "",
        "Continue training this LoRA/QLoRA adapter or P-tuning prefix (an earlier output_dir) on "
        "model_name_or_path, its base; rank, targets and prefix length come from the adapter.",
    )
    merge_adapter: bool = option(
        False,
        "Instead merge adapter_name_or_path into its base (written to output_dir/merged_base) and train "
        "finetuning_type anew on the merge.",
    )


@dataclass
class DataConfig:
    dataset: str = option("", "Training data: comma-separated local json/jsonl/csv/parquet files.")
    eval_dataset: str = option("", "Held-out data for eval loss and generation metrics (comma-separated).")
    val_size: float = option(
        0.0,
        "Hold out part of `dataset` for evaluation instead of an eval_dataset: a fraction (< 1) or a count of "
        "samples; chosen from `seed`, the same on every rank, identical samples kept on one side.",
    )
    dataset_format: Literal["auto", "alpaca", "sharegpt", "openai", "advertisegen", "chatglm3", "text"] = option(
        "auto", "Row format (auto: detected per file; text = raw documents for continued pre-training)."
    )
    prompt_column: str = option("content", "AdvertiseGen prompt column.")
    response_column: str = option("summary", "AdvertiseGen response column.")
    template: Literal[
        "auto", "glm4", "glm4_0414", "glmz1", "glm4_5", "glm4_7", "glm5_1", "glm5_2", "chatglm3", "chatglm2", "chatglm"
    ] = option(
        "auto", "Chat template (auto: the checkpoint's own chat_template matched to ours, else from the model type)."
    )
    cutoff_len: int = option(1024, "Maximum tokens per sample; the response keeps at least half.")
    packing: bool | None = option(
        None,
        "Pack several samples into each row of cutoff_len tokens (attention stays per sample); default: on for "
        "text data, off for conversations.",
    )
    group_by_length: bool = option(
        False,
        "Put samples of similar length in the same micro-batch (less padding, faster); each step still sees "
        "the same samples on any number of ranks, so the numbers do not depend on the split.",
    )
    mask_history: bool = option(False, "Train on the last assistant turn only (default: every assistant turn).")
    reasoning_history: Literal["expand", "keep", "drop"] = option(
        "expand",
        "glm4_5/glm4_7: an earlier turn's reasoning, which the format hides: expand = one more sample per "
        "such round, so each thought trains as the model saw it; keep = render it (glm4_7's clear_thinking=false); "
        "drop = do not train those turns.",
    )
    enable_thinking: bool | None = option(
        None,
        "Thinking formats: false renders rows that do not set their own enable_thinking as the model's "
        "thinking-off form (/nothink, empty thought); a dataset_info.json entry may set it per dataset. "
        "Default: each row's own switch, else thinking on, as the official templates do.",
    )
    train_on_prompt: bool = option(False, "Also train on prompt tokens (system, user, observation).")
    on_invalid: Literal["error", "skip"] = option(
        "error", "Bad data rows: 'error' stops with file:line; 'skip' skips and reports them."
    )
    max_samples: int = option(0, "Use only the first N training rows of each file, as LLaMA-Factory does (0 = all).")
    mix_probs: str = option(
        "",
        "Sample the dataset files with these probabilities (e.g. 0.8,0.2 for new.jsonl,old.jsonl): an epoch is as "
        "long as all files together, each file's share exact, the order fixed by seed.",
    )
    preprocessing_num_workers: int = option(
        1, "Processes that tokenize when the cache is built (the cache is the same for any number)."
    )
    dataset_dir: str = option(
        "", "Folder of a LLaMA-Factory dataset_info.json: dataset names resolve through it (read unchanged)."
    )
    dataset_columns: str = option(
        "", "Filled from dataset_info.json: each registered file's formatting, columns and tags (JSON)."
    )
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
    router_bias_update_rate: float = option(
        0.0,
        "MoE GLMs: auxiliary-loss-free balancing, each step e_score_correction_bias += rate x sign(mean - load) "
        "per expert over the global batch (DeepSeek-V3's rule, e.g. 0.001); 0 = off, the bias stays as loaded.",
    )
    expert_parallel_size: int = option(
        1, "MoE GLMs: hold each routed expert on 1/N of the ranks (DeepSpeed AutoEP expert parallelism); 1 = off."
    )
    per_device_train_batch_size: int = option(1, "Micro-batch size per rank.")
    per_device_eval_batch_size: int = option(8, "Eval micro-batch size per rank.")
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.")
    learning_rate: float = option(5e-5, "Peak learning rate.")
    lr_scheduler_type: Literal[
        "linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "cosine_with_min_lr"
    ] = option("linear", "Learning-rate schedule after warmup (Hugging Face's names).")
    lr_scheduler_kwargs: str = option(
        "",
        'The schedule\'s own arguments (JSON object): {"num_cycles": 2} for cosine_with_restarts, '
        '{"min_lr_rate": 0.1} or {"min_lr": 1e-6} for cosine_with_min_lr.',
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
    max_nonfinite_steps: int = option(
        3,
        "A step whose loss or gradient is NaN/inf is skipped on every rank (weights untouched); after this "
        "many in a row training stops, naming the last good checkpoint (0 = skip without limit).",
    )
    loss_spike_factor: float = option(
        0.0, "Also skip a step whose loss exceeds this many times the running median of recent losses (0 = off)."
    )
    bf16: bool = option(False, "Train in bfloat16 with fp32 master weights.")
    fp16: bool = option(
        False, "Train in float16 with fp32 master weights and dynamic loss scaling (GPUs without bf16: V100, T4)."
    )
    fp16_initial_scale_power: int = option(16, "fp16: the loss scale starts at 2**N.")
    fp16_loss_scale_window: int = option(1000, "fp16: steps without overflow before the scale doubles.")
    fp16_hysteresis: int = option(2, "fp16: overflows tolerated before the scale halves.")
    fp16_min_loss_scale: float = option(1.0, "fp16: the scale never goes below this.")

    @property
    def dtype(self):
        """The dtype the model trains in (the optimizer keeps fp32 master weights for bf16 and fp16)."""
        import torch

        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32

    gradient_checkpointing: bool = option(False, "Recompute activations in backward to save memory.")
    neftune_noise_alpha: float = option(
        0.0, "NEFTune: uniform noise of this scale on the input embeddings while training (e.g. 5; 0 = off)."
    )
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
    init_from_checkpoint: str = option(
        "",
        "Start a new run from a checkpoint's weights (new schedule, data order and hyperparameters; "
        "resume_from_checkpoint continues the same run instead).",
    )
    init_optimizer_state: bool = option(
        False, "With init_from_checkpoint: also take its optimizer moments (same world size and ZeRO stage)."
    )
    report_to: str = option(
        "tensorboard",
        "Trackers that also get every logged scalar and the config: wandb, swanlab (comma-separated; optional "
        "extras, pip install -e .[wandb]); tensorboard or none: local files only (output_dir/runs and "
        "metrics.jsonl are always written).",
    )
    run_name: str = option("", "The run's name in wandb / SwanLab (default: output_dir's folder name).")
    tracker_project: str = option("dist_glm", "wandb / SwanLab project (entity: WANDB_ENTITY, SWANLAB_WORKSPACE).")
    disable_tqdm: bool = option(False, "Turn off rank 0's progress bar (in a log file, its line every logging_steps).")
    preflight_timeout: int = option(
        300, "Seconds for every rank to join at start-up; a rank that cannot is reported with its host, not hung on."
    )
    ddp_timeout: int = option(1800, "Seconds one collective may wait for the other ranks before the job fails.")

    def global_batch_size(self, world_size: int) -> int:
        """Samples per optimizer step over all ranks: the unit every equivalence guarantee is stated in."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * world_size


DistillLoss = Literal["forward_kl", "reverse_kl", "jsd"]


@dataclass
class DistillConfig:
    teacher_model_name_or_path: str = option(
        "", "Distil from this frozen teacher: a model directory, an adapter or a checkpoint (empty = no distillation)."
    )
    teacher_adapter_name_or_path: str = option("", "A LoRA/QLoRA/P-tuning adapter applied to the teacher's base.")
    teacher_dtype: Dtype = option("auto", "Teacher weights' dtype (auto: the student's; bfloat16 saves half).")
    distill_loss: DistillLoss = option("forward_kl", "KD divergence: forward_kl, reverse_kl or jsd.")
    distill_alpha: float = option(0.5, "Weight of the KD term; 1 - alpha weighs cross-entropy on the labels.")
    distill_temperature: float = option(1.0, "Softmax temperature T of both models in KD (the term is scaled by T^2).")
    distill_jsd_beta: float = option(0.5, "jsd: weight of the teacher in the mixture, in (0, 1).")
    distill_cache: str = option(
        "",
        "Offline distillation: a teacher cache written by launch/distill_cache.py; training then loads no "
        "teacher (the cache tool writes here).",
    )
    distill_top_k: int = option(64, "launch/distill_cache.py: teacher logits kept per trainable token.")

    @property
    def enabled(self) -> bool:
        return bool(self.teacher_model_name_or_path or self.distill_cache)


Stage = Literal["sft", "pt", "dpo", "kto"]
PrefLoss = Literal["sigmoid", "hinge", "ipo", "orpo", "simpo"]


@dataclass
class PreferenceConfig:
    stage: Stage = option(
        "sft",
        "sft (supervised), pt (continued pre-training on raw text), dpo (preference pairs) or kto (answers labelled "
        "desirable or not); LLaMA-Factory's names, docs/preference.md. rm and ppo are not available yet.",
    )
    pref_loss: PrefLoss = option(
        "sigmoid", "stage=dpo: sigmoid (DPO), hinge, ipo, orpo or simpo (the last two need no reference model)."
    )
    pref_beta: float = option(0.1, "stage=dpo/kto: beta, how strongly the preference is enforced (the KL weight).")
    pref_ftx: float = option(
        0.0, "stage=dpo/kto: weight of an SFT term, the chosen (desirable) answer's mean NLL, added to the loss."
    )
    simpo_gamma: float = option(0.5, "stage=dpo, pref_loss=simpo: the target reward margin gamma.")
    kto_chosen_weight: float = option(1.0, "stage=kto: weight of the desirable answers' loss (KTO's lambda_D).")
    kto_rejected_weight: float = option(1.0, "stage=kto: weight of the undesirable answers' loss (KTO's lambda_U).")
    ref_model: str = option(
        "",
        "stage=dpo/kto: the reference model, frozen (a model directory). Default: the adapter switched off "
        "(lora, qlora), else a frozen copy of model_name_or_path.",
    )
    ref_logps_cache: str = option(
        "",
        "stage=dpo/kto: reference log-probabilities written by launch/ref_cache.py; training then loads no reference "
        "model (the cache tool writes here).",
    )

    @property
    def enabled(self) -> bool:
        """A preference stage: the data are pairs (dpo) or labelled answers (kto), not SFT rows."""
        return self.stage in ("dpo", "kto")

    @property
    def needs_reference(self) -> bool:
        return self.stage == "kto" or (self.stage == "dpo" and self.pref_loss in ("sigmoid", "hinge", "ipo"))


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "method": MethodConfig,
    "train": TrainConfig,
    "distill": DistillConfig,
    "preference": PreferenceConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)

    def to_flat_dict(self) -> dict:
        return {k: v for section in SECTIONS for k, v in dataclasses.asdict(getattr(self, section)).items()}


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_flat_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")


TRAIN = Command(
    prog="train.py",
    usage="train.py [CONFIG.yaml] [--key=value ...]",
    sections={name: (cls, None) for name, cls in SECTIONS.items()},
    description=f"With no arguments at all the demo recipe {DEMO_CONFIG.relative_to(REPO_ROOT)} is used.",
    default_yaml=DEMO_CONFIG,
)
TRAIN_KEYS = frozenset(TRAIN.fields())


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
