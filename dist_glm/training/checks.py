"""What a training run's inputs must satisfy before any process group forms or model loads: the
files the config names (model, data, DeepSpeed JSON), the method's own refusals, the output and resume
directories. Every rank runs the same checks on the same inputs, so every rank fails the same way, and
every problem is reported at once, with the config's own (`problems`)."""

from dataclasses import dataclass
from pathlib import Path

from dist_glm.checkpointing import checkpoints
from dist_glm.config import Config
from dist_glm.data.registry import check_stage, resolve_and_check
from dist_glm.errors import UserError
from dist_glm.methods import Method, get_method
from dist_glm.models import moe
from dist_glm.models.loading import check_attention, check_liger, check_model_path, check_remote_code
from dist_glm.objectives import check_objective
from dist_glm.runtime import deepspeed_config, environment
from dist_glm.training.continued import adopt_adapter, check_init


@dataclass
class Inputs:
    """What validation resolved, so that setup does not compute it again."""

    ds_config: dict
    resume_path: Path | None
    method: Method  # resolved once, after an adapter being continued has said which method it is
    teacher: object = None  # the distillation teacher's resolved artifact (dist_glm.models.artifacts), if any


def validate_inputs(cfg: Config, world_size: int, problems: list[str] = ()) -> Inputs:
    """Everything that can be checked before a process group forms; identical on every rank. Raises one
    UserError with these problems and the config's own (`problems`), so a user sees them all at once."""
    problems = list(problems)
    student_ok, teacher = False, None
    if cfg.model.model_name_or_path:
        student_problems = check_model_path(cfg.model.model_name_or_path, cfg.model.train_from_scratch)
        try:  # before any rank loads: a checkpoint that needs its own code is one line, with the fix
            check_remote_code(cfg.model.model_name_or_path, cfg.model.trust_remote_code)
        except UserError as e:
            student_problems += e.problems
        problems += student_problems
        student_ok = not student_problems
    if student_ok:  # the teacher's tokenizer is compared with the student's, so the student's must load
        objective_problems, teacher = check_objective(cfg)
        problems += objective_problems
    problems += resolve_and_check(cfg.data)  # names, folders and globs become files, then checked
    problems += check_stage(cfg.data, cfg.preference.stage)
    ds_config = resume_path = None
    try:
        ds_config = deepspeed_config.build_ds_config(cfg.train, world_size)
    except UserError as e:
        problems += e.problems
    problems += (
        check_attention(cfg.model) + check_liger(cfg.model) + check_fp16_here(cfg.train) + moe.check_model(cfg.model)
    )
    problems += adopt_adapter(cfg)  # first: the adapter's rank and targets are what the method checks
    problems += check_init(cfg, world_size)
    method = get_method(cfg.method.finetuning_type)
    problems += method.check_config(cfg)
    if ds_config is not None:
        problems += moe.check_expert_parallel(cfg.model, deepspeed_config.expert_parallel_size(ds_config), method)
    problems += moe.check_router_bias_update(cfg.model, cfg.train.router_bias_update_rate, method)
    t = cfg.train
    problems += check_output_dir(t.output_dir) + checkpoints.foreign_leftovers(t.output_dir)
    problems += check_apart_from_inputs(cfg)
    problems += check_from_scratch(cfg)
    existing = checkpoints.list_checkpoints(t.output_dir) if t.output_dir and Path(t.output_dir).is_dir() else []
    if existing and not t.resume_from_checkpoint and not t.overwrite_output_dir:
        problems.append(
            f"output_dir='{t.output_dir}' already holds {existing[-1][1].name}; pass "
            "--resume_from_checkpoint=auto to continue it or --overwrite_output_dir to start over"
        )
    try:
        resume_path = checkpoints.resolve_resume_path(t.resume_from_checkpoint, t.output_dir, warn=_rank0_print)
    except UserError as e:
        problems += e.problems
    if problems:
        raise UserError(problems)
    return Inputs(ds_config, resume_path, method, teacher)


def check_fp16_here(t) -> list[str]:
    """fp16 needs the accelerator's fp16 kernels: every CUDA GPU has them; DeepSpeed's CPU accelerator only
    where oneDNN has fp16 (AVX512-FP16 or AMX-FP16 CPUs), and it refuses fp16 deep inside initialize otherwise."""
    if not t.fp16:
        return []
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.is_fp16_supported():
        return []
    return [
        f"fp16=true: this machine's accelerator ({accelerator.device_name()}) has no fp16 support (a CPU needs "
        "AVX512-FP16 or AMX-FP16); use bf16 where it is supported, or fp32"
    ]


def check_output_dir(output_dir: str) -> list[str]:
    """A directory we can create or use: not a file, and not under one."""
    if not output_dir:
        return []
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        return [f"output_dir='{output_dir}' is a file; choose a directory for checkpoints and the final model"]
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return [f"output_dir='{output_dir}': '{blocker}' is a file, so the directory cannot be created there"]
    return []


def _overlap(a: Path, b: Path) -> str | None:
    """How `a` (output_dir) relates to `b`, or None when they are apart."""
    a, b = a.resolve(), b.resolve()
    if a == b:
        return "is"
    if b in a.parents:
        return "lies inside"
    if a in b.parents:
        return "contains"
    return None


def check_apart_from_inputs(cfg: Config) -> list[str]:
    """A run never writes into what it reads: output_dir receives checkpoints, the final model (replacing
    model files) and, with overwrite_output_dir, loses its old checkpoints, whatever overwrite_output_dir
    says about the inputs. So it may not be, contain or lie inside any model, adapter or checkpoint read."""
    out = cfg.train.output_dir
    if not out:
        return []
    read = {
        "model_name_or_path": cfg.model.model_name_or_path,
        "adapter_name_or_path": cfg.model.adapter_name_or_path,
        "teacher_model_name_or_path": cfg.distill.teacher_model_name_or_path,
        "teacher_adapter_name_or_path": cfg.distill.teacher_adapter_name_or_path,
        "init_from_checkpoint": cfg.train.init_from_checkpoint,
    }
    problems = []
    for key, value in read.items():
        if value and Path(value).exists() and (how := _overlap(Path(out), Path(value))):
            problems.append(
                f"output_dir='{out}' {how} {key}='{value}': the run would write its checkpoints and final model "
                "over what it reads; pass another --output_dir (e.g. a new directory beside it)"
            )
    return problems


def check_from_scratch(cfg: Config) -> list[str]:
    """train_from_scratch=true with a model directory that holds trained weights would silently discard
    them (a shipped demo recipe sets it, and a user continuing from their trained model keeps it)."""
    from dist_glm.models.loading import WEIGHT_FILES

    path = Path(cfg.model.model_name_or_path or "")
    if not cfg.model.train_from_scratch or not path.is_dir():
        return []
    weights = next((f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if weights is None:
        return []
    return [
        f"train_from_scratch=true would discard the trained weights in model_name_or_path='{path}' ({weights}) "
        "and start from random ones; pass --train_from_scratch=false to train from them, or point "
        "model_name_or_path at a directory with only config.json and the tokenizer to start from scratch"
    ]


def _rank0_print(message: str) -> None:
    # Before the process group forms every rank runs this; rank 0 (from the launcher's environment) speaks.
    if environment.rank_from_env() == 0:
        print(f"[dist_glm] {message}", flush=True)
