"""Export: turn any trained artifact into one standalone HF model directory (safetensors weights, config,
tokenizer, generation config) that `AutoModelForCausalLM.from_pretrained` loads with no PEFT, DeepSpeed
or bitsandbytes.

- LoRA adapter + base: the adapter is merged into the base weights (W + scale * B @ A).
- QLoRA adapter + base: the base is rebuilt quantized exactly as it was trained, de-quantized to
  ordinary weights, and the adapter merged into those. The result is what the adapter model computes
  (to float rounding), not the original full-precision base plus the adapter, which the adapter never
  saw in training.
- A training checkpoint (any method but ptuning, any ZeRO stage, ZeRO-3 included): consolidated from
  every rank's partition (fp32 master weights), merged when it holds an adapter.
- `export_layout=original` writes a model trained from THUDM's published ChatGLM2/ChatGLM3/glm-4-9b-chat
  directory back in that layout (dist_glm/models/chatglm.py `write_original`); a P-tuning v2 prefix on such
  a directory becomes THUDM's P-tuning checkpoint (`transformer.prefix_encoder`, `pre_seq_len` in config.json).
- Otherwise P-tuning v2 is refused: a prefix is extra key/value vectors in every layer's attention, not a change
  of any weight, so no plain HF model can carry it. Use the prefix as it is (chat.py, evaluate.py,
  `dist_glm.models.artifacts.load_for_inference`).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dist_glm.config import Command, option
from dist_glm.errors import UserError
from dist_glm.methods import get_method
from dist_glm.models import chatglm
from dist_glm.models.artifacts import ModelArgs, resolve_artifact, write_merged


@dataclass
class ExportArgs:
    export_dir: str = option("", "Directory for the exported HF model.")
    overwrite_export_dir: bool = option(False, "Replace export_dir if it is not empty.")
    max_shard_size: str = option("5GB", "Largest safetensors file; bigger models are split into shards.")
    export_layout: Literal["native", "original"] = option(
        "native",
        "native: transformers' own layout (GlmForCausalLM). original: for a model trained from THUDM's published "
        "ChatGLM2/ChatGLM3/glm-4-9b-chat directory, that layout again: THUDM's weight names, that directory's "
        "config.json, tokenizer files and *.py files (THUDM's demos and chatglm.cpp-style converters read it).",
    )


EXPORT = Command(
    prog="export.py",
    usage="export.py --model_name_or_path=DIR [--adapter_name_or_path=DIR] --export_dir=DIR [--key=value ...]",
    sections={"model": (ModelArgs, None), "export": (ExportArgs, None)},
)


def _within(a: Path, b: Path) -> bool:
    """Whether a is b or inside it."""
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def check_export_dir(args: ExportArgs, sources: list[Path]) -> list[str]:
    if not args.export_dir:
        return ["export_dir is required; set it to a new directory for the exported model"]
    out = Path(args.export_dir)
    for src in sources:
        if _within(src, out) or _within(out, src):
            return [f"export_dir='{out}' overlaps the model being exported ('{src}'); choose another directory"]
    if out.exists() and not out.is_dir():
        return [f"export_dir='{out}' is a file; choose a directory"]
    if out.is_dir() and any(out.iterdir()) and not args.overwrite_export_dir:
        return [f"export_dir='{out}' is not empty; pass --overwrite_export_dir to replace it, or choose another one"]
    return check_shard_size(args.max_shard_size)


def check_shard_size(value: str) -> list[str]:
    """What save_pretrained accepts (a whole number with a unit), checked before anything loads."""
    import re

    if re.fullmatch(r"[1-9]\d*[KMGT]i?B", value.strip(), flags=re.I):
        return []
    return [f"max_shard_size='{value}' is not a size; use a whole number with a unit, e.g. 500MB, 5GB, 2GiB"]


def published_layout(art) -> chatglm.Layout | None:
    """The published ChatGLM directory `art` was trained from: its base (an adapter's), or the model its
    training recipe names (a full or freeze run, whose base is the trained model itself)."""
    from dist_glm.config import load_config

    layout = chatglm.detect(art.base)
    recipe = art.train_cfg
    if layout is None and recipe is None and (art.source / "config.yaml").is_file():
        try:
            recipe = load_config([str(art.source / "config.yaml")], default_yaml=None)
        except UserError:
            return None  # not a recipe this version reads: no published layout to go back to
    if layout is None and recipe is not None:
        layout = chatglm.detect(recipe.model.model_name_or_path)
    return layout


def export(model_args: ModelArgs, args: ExportArgs) -> Path:
    """Write the merged / consolidated model to `args.export_dir`; returns that path."""
    art = resolve_artifact(model_args.model_name_or_path, model_args.adapter_name_or_path)
    method = get_method(art.method)
    layout = published_layout(art) if args.export_layout == "original" else None
    # In THUDM's layout, some adapters are written as they are (P-tuning v2's prefix encoder), not merged.
    alone = method.published_tensors(art.adapter) if layout is not None and art.adapter is not None else None
    problems = [method.export_refusal] if method.export_refusal and alone is None else []
    problems += check_export_dir(args, [p for p in (art.base, art.adapter, art.checkpoint) if p is not None])
    if args.export_layout == "original" and layout is None:
        problems.append(
            f"export_layout=original: '{art.source}' was not trained from one of THUDM's published ChatGLM2/"
            "ChatGLM3/glm-4-9b-chat directories, whose layout it would write; use export_layout=native"
        )
    if problems:
        raise UserError(problems)

    out = Path(args.export_dir)
    if alone is not None:
        dtype = chatglm.write_published_adapter(alone, layout, out, model_args.dtype, art.adapter)
        what = f"{layout.name} P-tuning v2 checkpoint, {str(dtype).removeprefix('torch.')}"
        print(f"[dist_glm] exported {art.source} ({what}) to {out}", flush=True)
        return out
    dtype = write_merged(art, model_args.dtype, out, model_args.trust_remote_code, args.max_shard_size, layout)
    what = f"{art.method} adapter merged into its base" if method.is_adapter else "model"
    how = f", {layout.name} layout as THUDM published it" if layout else ""
    print(f"[dist_glm] exported {art.source} ({what}, {str(dtype).removeprefix('torch.')}{how}) to {out}", flush=True)
    return out
