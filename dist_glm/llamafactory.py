"""Keys a recipe pasted from LLaMA-Factory (its examples/train_*/*.yaml) carries that are not ours.

Harmless ones are accepted with at most a one-line note saying what dist_glm does instead; keys for
things dist_glm does not do are errors that say so. Keys both projects share (model_name_or_path,
finetuning_type, lora_target incl. `all`, template, cutoff_len, val_size, plot_loss, the TrainingArguments
names)
need nothing here. Imports nothing from the package: the config loader consults it.
"""

# key -> {value (lower-cased string) or "*": (note or None, problem or None)}
_ANY = "*"
KEYS: dict[str, dict[str, tuple[str | None, str | None]]] = {
    "do_train": {
        "true": (None, None),
        _ANY: (None, "do_train={value}: launch/train.py always trains; to evaluate a result use launch/evaluate.py"),
    },
    "do_eval": {_ANY: ("do_eval is implied: evaluation runs whenever eval_dataset or val_size is set", None)},
    "eval_strategy": {
        "no": (None, None),
        "steps": (None, None),
        _ANY: (None, "eval_strategy={value}: dist_glm evaluates every eval_steps steps; set eval_steps instead"),
    },
    # report_to (and run_name) are ours too (TrainConfig): the names mean the same in both projects.
    "overwrite_cache": {
        _ANY: (
            "overwrite_cache is not needed: the tokenized cache is keyed by the files' content and every data setting",
            None,
        )
    },
    "dataloader_num_workers": {
        _ANY: ("dataloader_num_workers is ignored: batches are built from the in-memory token cache", None)
    },
    "save_only_model": {
        "false": (None, None),
        _ANY: ("save_only_model is ignored: checkpoints keep optimizer state so that a resume continues exactly", None),
    },
    "quantization_method": {
        "bnb": (None, None),
        "bitsandbytes": (None, None),
        _ANY: (
            None,
            "quantization_method={value} is not supported; dist_glm's QLoRA quantizes with bitsandbytes (bnb)",
        ),
    },
    "interleave_probs": {
        _ANY: (
            None,
            "interleave_probs={value}: rename it mix_probs (each file gets its exact share per epoch)",
        )
    },
    "flash_attn": {
        "auto": ("flash_attn=auto: dist_glm's attn_implementation is sdpa unless set", None),
        _ANY: (
            None,
            "flash_attn={value}: set attn_implementation instead (flash_attention_2 for fa2, sdpa, or eager "
            "for disabled)",
        ),
    },
    "use_swanlab": {
        "false": (None, None),
        _ANY: (None, "use_swanlab={value}: set report_to=swanlab (tracker_project and run_name name the run)"),
    },
    "swanlab_project": {_ANY: (None, "swanlab_project={value}: rename it tracker_project (with report_to=swanlab)")},
    "swanlab_run_name": {_ANY: (None, "swanlab_run_name={value}: rename it run_name")},
    "mix_strategy": {
        "concat": (None, None),
        _ANY: (None, "mix_strategy={value}: remove it and set mix_probs (exact shares per epoch, seeded order)"),
    },
}


def check(key: str, value) -> tuple[str | None, str | None] | None:
    """(note, problem) for a LLaMA-Factory key, or None when `key` is not one of them."""
    if key not in KEYS:
        return None
    text = str(value).lower() if not isinstance(value, bool) else ("true" if value else "false")
    note, problem = KEYS[key].get(text, KEYS[key].get(_ANY, (None, None)))
    fill = lambda s: s.format(value=value) if s else s  # noqa: E731
    return fill(note), fill(problem)


QUANTIZATION_KEYS = ("quantization_bit", "quantization_type", "double_quantization", "quantization_method")
# finetuning_type -> the one that trains it on a quantized base (LLaMA-Factory: lora + quantization_bit).
QUANTIZED = {"lora": "qlora", "qlora": "qlora"}


def translate(raw: dict) -> tuple[dict, list[str], list[str]]:
    """What a recipe's keys mean together, where LLaMA-Factory spells a setting with several keys: (our
    keys to set, notes, problems). `raw` is the recipe and the command line merged, before conversion.

    - `finetuning_type: lora` + `quantization_bit` is QLoRA there (its only spelling): finetuning_type=qlora.
    - a quantization key beside a method that does not quantize is an error, never ignored in silence.
    - `stage: pt` is continued pre-training on raw text: dataset_format=text.
    """
    sets, notes, problems = {}, [], []
    method = str(raw.get("finetuning_type") or "lora").lower()
    given = [k for k in QUANTIZATION_KEYS if raw.get(k) is not None]
    has_bit = raw.get("quantization_bit") is not None
    quantized_as = QUANTIZED.get(method)  # the method that trains this one on a quantized base, if any
    if given and quantized_as is None:
        problems.append(
            f"{', '.join(given)}: finetuning_type={method} does not quantize its base, so these would be ignored; "
            "remove them, or train finetuning_type=lora with quantization_bit=4 (QLoRA)"
        )
    elif has_bit and quantized_as != method:
        sets["finetuning_type"] = quantized_as
        notes.append(
            f"finetuning_type={method} with quantization_bit={raw['quantization_bit']} is QLoRA, as in "
            f"LLaMA-Factory: training finetuning_type={quantized_as}"
        )
    elif given and quantized_as != method:
        problems.append(
            f"{', '.join(given)} without quantization_bit: QLoRA needs quantization_bit=4 (or 8); "
            "add it, or remove them"
        )
    if str(raw.get("stage") or "").lower() == "pt":
        asked = str(raw.get("dataset_format") or "auto").lower()
        if asked not in ("auto", "text"):
            problems.append(f"stage=pt trains raw text, but dataset_format={asked}; remove one of them")
        else:
            sets["dataset_format"] = "text"
            notes.append("stage=pt: continued pre-training on raw text (dataset_format=text): every token trains")
    return sets, notes, problems
