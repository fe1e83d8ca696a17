"""What a path names and how to load it: a trained result outside training, from whatever artifact
training produced (used by evaluate, chat, export and serve).

What a path may name; `resolve_artifact` tells them apart, and reports every mistake, before anything
loads:
- a full HF model: the `full`/`freeze` export, an exported merge, or any base checkpoint;
- a PEFT adapter directory: LoRA, QLoRA (with `quantization_config.json`, so the same quantized base is
  rebuilt) or a P-tuning v2 prefix, applied to `--model_name_or_path` or to the base recorded in its
  adapter_config.json;
- a training checkpoint `output_dir/checkpoint-STEP/` of any method under any ZeRO stage: its weights
  are consolidated from DeepSpeed's files (under ZeRO 1-3, the fp32 master weights of every rank's
  partition) and applied to the base named in its config.yaml, since adapter and freeze checkpoints
  hold only the trained weights.

What differs between methods is asked of the method (dist_glm.methods), never branched on by name.
"""

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dist_glm.checkpointing import checkpoints
from dist_glm.checkpointing.weights import read_checkpoint_weights
from dist_glm.config import Dtype, option
from dist_glm.errors import UserError
from dist_glm.methods import adapter_method, get_method
from dist_glm.runtime import environment

ARTIFACT_KINDS = "a model directory, an adapter directory or a training checkpoint (output_dir/checkpoint-STEP)"


@dataclass
class ModelArgs:
    """What to load; the first section of evaluate.py, chat.py, export.py and serve.py."""

    model_name_or_path: str = option("", f"The trained result: {ARTIFACT_KINDS}; or the base model of an adapter.")
    adapter_name_or_path: str = option("", "A LoRA/QLoRA adapter or P-tuning v2 prefix to apply to model_name_or_path.")
    trust_remote_code: bool = option(
        False,
        "Run the checkpoint's own modelling code: remote-code layouts dist_glm does not translate "
        "(ChatGLM2/3 and glm-4-9b-chat as THUDM published them load without it).",
    )
    dtype: Dtype = option(
        "auto",
        "auto: the model's own dtype on a GPU, float32 on CPU (export: its own dtype; serve: bfloat16 on a GPU).",
    )


ADAPTER_FILE = "adapter_config.json"
DTYPES = {name: getattr(torch, name) for name in ("float32", "bfloat16", "float16")}


# ---------------------------------------------------------------- what a path names


@dataclass
class Artifact:
    base: Path  # HF model directory: the weights (or only the architecture, from scratch) and tokenizer
    method: str  # what trained it: full, freeze, lora, qlora or ptuning
    adapter: Path | None = None  # PEFT adapter directory
    checkpoint: Path | None = None  # training checkpoint directory
    train_cfg: object = None  # the checkpoint's resolved training config (dist_glm.config.Config)

    @property
    def source(self) -> Path:
        """The directory that holds the trained weights."""
        return self.checkpoint or self.adapter or self.base

    @property
    def tokenizer_dir(self) -> Path:
        # Training saves the tokenizer next to an adapter; a checkpoint's comes from its base.
        if self.adapter is not None and (self.adapter / "tokenizer_config.json").is_file():
            return self.adapter
        return self.base


def is_checkpoint(path: Path) -> bool:
    return (path / checkpoints.STATE_FILE).is_file() and (path / checkpoints.TAG).is_dir()


def _recorded_base(adapter: Path) -> str:
    return json.loads((adapter / ADAPTER_FILE).read_text()).get("base_model_name_or_path") or ""


def _adapter_method(adapter: Path) -> str:
    config = json.loads((adapter / ADAPTER_FILE).read_text())
    method = adapter_method(adapter, config)
    if method is None:
        raise UserError(
            f"adapter_name_or_path='{adapter}': a {config.get('peft_type', 'unknown')} adapter, which no dist_glm "
            "method trains (lora, qlora and ptuning do)"
        )
    return method


def _not_a_model(name: str, path: Path) -> str | None:
    if not path.is_dir():
        return f"{name}='{path}': no such directory; pass {ARTIFACT_KINDS}"
    found = checkpoints.list_checkpoints(str(path))
    if found and not (path / "config.json").is_file():
        return (
            f"{name}='{path}' holds training checkpoints but no final model (did the run finish?); "
            f"pass one of them, e.g. {found[-1][1]}"
        )
    if not (path / "config.json").is_file():
        return (
            f"{name}='{path}': no config.json, adapter_config.json or trainer_state.json there; pass {ARTIFACT_KINDS}"
        )
    return None


def resolve_artifact(model_name_or_path: str, adapter_name_or_path: str = "") -> Artifact:
    """Classify the paths without loading anything; raise one UserError naming the fix."""
    model = Path(model_name_or_path) if model_name_or_path else None
    adapter = Path(adapter_name_or_path) if adapter_name_or_path else None
    if adapter is not None and model is None:
        recorded = _recorded_base(adapter) if (adapter / ADAPTER_FILE).is_file() else ""
        hint = f" (its adapter_config.json names '{recorded}')" if recorded else ""
        raise UserError(f"adapter_name_or_path='{adapter}' needs its base model: pass --model_name_or_path=BASE{hint}")
    if model is None:
        raise UserError(f"model_name_or_path is required; pass {ARTIFACT_KINDS}")
    if adapter is None and is_checkpoint(model):
        return _checkpoint_artifact(model, base=None)
    if adapter is None and (model / ADAPTER_FILE).is_file():
        recorded = _recorded_base(model)
        if not (Path(recorded) / "config.json").is_file():
            raise UserError(
                f"model_name_or_path='{model}' is an adapter trained on '{recorded}', which is not a model "
                f"directory here; pass --model_name_or_path=BASE --adapter_name_or_path={model}"
            )
        model, adapter = Path(recorded), model
    if adapter is not None and (is_checkpoint(model) or (model / ADAPTER_FILE).is_file()):
        raise UserError(
            f"model_name_or_path='{model}' must be the base model when adapter_name_or_path is given; "
            f"pass the trained result alone as --model_name_or_path={model}"
        )
    if adapter is not None and is_checkpoint(adapter):  # a checkpoint moved away from its base: base given here
        return _checkpoint_artifact(adapter, base=model)
    problems = [p for p in [_not_a_model("model_name_or_path", model)] if p]
    if adapter is not None and not (adapter / ADAPTER_FILE).is_file():
        problems.append(
            f"adapter_name_or_path='{adapter}': no {ADAPTER_FILE} there; pass the output_dir of a "
            "lora, qlora or ptuning run (or one of its checkpoints)"
        )
    if problems:
        raise UserError(problems)
    if adapter is None:
        from dist_glm.models.loading import check_model_path

        problems = check_model_path(str(model), from_scratch=False)
        if problems:
            raise UserError(problems)
        return Artifact(base=model, method="full")
    check_adapter_base(adapter, model)
    return Artifact(base=model, method=_adapter_method(adapter), adapter=adapter)


def _identity(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return f"model_type {config.get('model_type')}, {', '.join(config.get('architectures') or []) or 'no architecture'}"


def check_adapter_base(adapter: Path, base: Path) -> None:
    """An adapter applied to another model than the one it trained on: with other shapes PEFT fails (one
    line, in load_artifact); with the same shapes (a GLM-4 adapter on a GLM-4-0414 base) it would load
    and compute nonsense. Where the base its adapter_config.json records is here, its architecture must be
    the given base's; where it is not (moved, another machine), that cannot be checked and is allowed."""
    recorded = Path(_recorded_base(adapter) or "")
    if not str(recorded) or not (recorded / "config.json").is_file() or recorded.resolve() == base.resolve():
        return
    try:
        theirs, mine = _identity(recorded), _identity(base)
    except (OSError, ValueError):
        return  # an unreadable config.json is reported when the model loads
    if theirs != mine:
        raise UserError(
            f"adapter_name_or_path='{adapter}' was trained on '{recorded}' ({theirs}) but model_name_or_path="
            f"'{base}' is {mine}; pass the base it was trained on"
        )


def _checkpoint_artifact(ckpt: Path, base: Path | None) -> Artifact:
    from dist_glm.config import load_config
    from dist_glm.models.loading import check_model_path

    cfg_file = ckpt / "config.yaml"
    if not cfg_file.is_file():
        raise UserError(f"checkpoint '{ckpt}' has no config.yaml; it was not written by dist_glm")
    cfg = load_config([str(cfg_file)], default_yaml=None)
    recorded = cfg.model.model_name_or_path
    base = base or Path(recorded)
    # A checkpoint of every weight: the base only contributes its config and tokenizer.
    from_scratch = cfg.model.train_from_scratch or not get_method(cfg.method.finetuning_type).trainable_only
    problems = check_model_path(str(base), from_scratch)
    if problems:
        raise UserError(
            f"checkpoint '{ckpt}' was trained from model_name_or_path='{recorded}' (its config.yaml), which is "
            f"not usable here ({problems[0]}); pass --model_name_or_path=BASE --adapter_name_or_path={ckpt}"
        )
    cfg.model.model_name_or_path = str(base)
    return Artifact(base=base, method=cfg.method.finetuning_type, checkpoint=ckpt, train_cfg=cfg)


# ---------------------------------------------------------------- loading


def resolve_dtype(
    name: str, art: Artifact, device: torch.device, for_export: bool = False, trust_remote_code: bool = False
) -> torch.dtype:
    """'auto': the base model's own dtype (its config.json) when exporting or on a GPU; float32 on CPU,
    where half-precision matmuls are slow, and for a config that names none."""
    if name != "auto":
        return DTYPES[name]  # one of config.Dtype's choices
    if not for_export and device.type == "cpu":
        return torch.float32
    from dist_glm.models.loading import load_config

    own = getattr(load_config(art.base, trust_remote_code), "dtype", None)
    own = getattr(torch, own, None) if isinstance(own, str) else own
    return own if own in DTYPES.values() else torch.float32


def load_for_inference(
    model_name_or_path: str,
    adapter_name_or_path: str = "",
    dtype=torch.float32,
    *,
    device: torch.device | str | None = None,
    dequantize: bool = False,
    trust_remote_code: bool = False,
):
    """The model in eval mode, from any artifact (see the module docstring). `device` defaults to this
    process's accelerator (the CPU without one). `dequantize`: a QLoRA base is rebuilt quantized, exactly
    as trained, then turned back into ordinary weights of `dtype` (what export merges into)."""
    art = resolve_artifact(model_name_or_path, adapter_name_or_path)
    return load_artifact(art, dtype, device, dequantize, trust_remote_code=trust_remote_code)


def load_artifact(
    art: Artifact,
    dtype=torch.float32,
    device=None,
    dequantize: bool = False,
    *,
    partition_with: dict | None = None,
    trust_remote_code: bool = False,
):
    """The one way a trained result loads (the tools, export, the distillation teacher). `partition_with`:
    a ZeRO-3 DeepSpeed config under which a model directory (and its adapter) loads partitioned over the
    ranks, collectively (a training checkpoint is rebuilt whole, as before)."""
    device = torch.device(device) if device is not None else environment.local_device()
    method = get_method(art.method)
    if art.checkpoint is not None:
        model = _load_checkpoint(art, method, dtype, device, dequantize)
    else:
        quantization = method.inference_quantization(art.adapter) if art.adapter is not None else None
        if partition_with is not None:
            from dist_glm.config import ModelConfig
            from dist_glm.models.loading import load_model

            base_cfg = ModelConfig(model_name_or_path=str(art.base), trust_remote_code=trust_remote_code)
            model = load_model(base_cfg, partition_with, dtype, 0, quantization)  # partitioned while it loads
        else:
            model = _load_base(art.base, dtype, device, quantization, dequantize, trust_remote_code)
        if art.adapter is not None:
            from peft import PeftModel

            from dist_glm.methods.lora_targets import native_targets

            try:
                with native_targets(model):  # an MoE adapter keeps the targets it was trained with
                    model = PeftModel.from_pretrained(model, art.adapter)
            except RuntimeError as e:  # PEFT's size-mismatch report: dozens of lines for one mistake
                if "size mismatch" not in str(e):
                    raise
                first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), "")
                raise UserError(
                    f"adapter_name_or_path='{art.adapter}' does not fit the base '{art.base}' ({first.rstrip('.')}); "
                    "pass the base model it was trained on"
                ) from None
    method.after_load(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if (art.base / "generation_config.json").is_file():  # a model built from its config alone lacks it
        from transformers import GenerationConfig

        base.generation_config = GenerationConfig.from_pretrained(art.base)
    base.config.use_cache = base.generation_config.use_cache = True  # turned off for training
    base.config.name_or_path = str(art.base)  # where the tokenizer is; a model built from its config has none
    return model.eval()


def _load_base(path: Path, dtype, device, quantization, dequantize: bool, trust_remote_code: bool = False):
    from dist_glm.models.loading import from_pretrained

    try:
        model = from_pretrained(
            path,
            dtype=dtype,
            quantization_config=quantization,
            device_map={"": device},
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as e:
        raise UserError(f"model_name_or_path='{path}': could not load weights ({str(e).splitlines()[0]})") from None
    except RuntimeError as e:
        from dist_glm.models.loading import weights_do_not_fit

        raise weights_do_not_fit(path, e) from None
    if quantization is not None and dequantize:
        model = model.dequantize(dtype=dtype)
    return model


def _load_checkpoint(art: Artifact, method, dtype, device, dequantize: bool):
    """Rebuild the trained module exactly as training built it (base, quantization, PEFT wrapping), then
    load the checkpoint's weights into it."""
    from dist_glm.models.loading import check_model_path, load_model

    cfg = art.train_cfg
    state = read_checkpoint_weights(art.checkpoint, method.trainable_only)
    quantization = method.quantization_config(cfg)
    model_cfg = cfg.model
    if not method.trainable_only and check_model_path(model_cfg.model_name_or_path, from_scratch=False):
        # Every weight is in the checkpoint: a base directory with only config and tokenizer will do.
        model_cfg = replace(model_cfg, train_from_scratch=True)
    model = load_model(model_cfg, {}, dtype, cfg.train.seed, quantization)
    if quantization is not None and dequantize:
        model = model.dequantize(dtype=dtype)
    if quantization is None or dequantize:
        model = model.to(device=device, dtype=dtype)
    # Built exactly as training built it (PEFT wrapping included; a de-quantized QLoRA base takes plain
    # LoRA) so the checkpoint's names fit.
    model = method.make_trainable(model, cfg)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise UserError(f"checkpoint '{art.checkpoint}': does not fit base '{art.base}' ({str(e)[:300]})") from None
    missing = [] if method.trainable_only else missing
    if unexpected or missing:
        odd = (unexpected or missing)[0]
        raise UserError(
            f"checkpoint '{art.checkpoint}': {len(unexpected)} weights not in the model built from '{art.base}' "
            f"and {len(missing)} missing (e.g. {odd}); is that the base it was trained from?"
        )
    return model


def write_merged(
    art: Artifact, dtype_name: str, out: Path, trust_remote_code: bool, max_shard_size: str = "5GB", original=None
):
    """A plain HF model of `art` in `out` (an adapter merged into its de-quantized base, a checkpoint
    consolidated), on the CPU; returns the dtype written. `original`: the base's published ChatGLM layout
    (models/chatglm.py), to write that layout instead of transformers' own. Staged in a fresh directory beside `out` and
    swapped in when complete (dist_glm.runtime.staging): an interrupted write never looks finished, and
    nothing but that staging directory (and `out`, which the caller checked may be replaced) is removed."""
    from dist_glm.models.loading import load_tokenizer
    from dist_glm.models.moe import carry_unloaded_tensors
    from dist_glm.runtime.staging import as_umask_allows, staged

    cpu = torch.device("cpu")
    dtype = resolve_dtype(dtype_name, art, cpu, for_export=True, trust_remote_code=trust_remote_code)
    model = load_artifact(art, dtype, cpu, dequantize=True, trust_remote_code=trust_remote_code)
    if hasattr(model, "merge_and_unload"):  # a PeftModel: fold the adapter into the base weights
        model = model.merge_and_unload()
    model = model.to(dtype)
    model.config.use_cache = True
    if hasattr(model.config, "quantization_config"):  # de-quantized: the weights are ordinary now
        del model.config.quantization_config
    tokenizer = load_tokenizer(str(art.tokenizer_dir), trust_remote_code)
    with staged(out) as tmp:
        if original is not None:
            from dist_glm.models.chatglm import write_original

            write_original(model, original, tmp, dtype, max_shard_size)
        else:
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
            tokenizer.save_pretrained(tmp)
            if model.generation_config is not None:
                model.generation_config.save_pretrained(tmp)
        if carried := carry_unloaded_tensors(art.base, tmp):
            print(f"[dist_glm] {carried}", flush=True)
        tmp.chmod(0o755)  # mkdtemp makes it 0700; an exported model is read by others (serving engines)
        as_umask_allows(tmp)
    return dtype


def generation_eos_ids_of(model, tokenizer) -> list[int]:
    from dist_glm.models.loading import generation_eos_ids

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return generation_eos_ids(base, tokenizer)
