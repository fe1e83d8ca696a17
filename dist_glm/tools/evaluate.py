"""Evaluation, during training and as a command (launch/evaluate.py): loss/perplexity on an eval set
and, optionally, generation metrics, with the same functions in both, so the numbers are comparable.

`eval_loss` and `predict` take any nn.Module (a DeepSpeed engine is one) and leave it in the mode they
found it in. Both are collectives. Every rank runs the same number of forward passes (ZeRO-3 gathers
weights inside each forward, so a rank that stopped early would hang the others): the eval set is split
into equal shards, and padding slots in the last shard carry no labels and no weight.
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from dist_glm.config import TRAIN_KEYS, Command, DataConfig, option
from dist_glm.errors import UserError
from dist_glm.models.artifacts import ModelArgs
from dist_glm.runtime import collectives, environment
from dist_glm.training.evaluation import eval_loss, predict


@dataclass
class EvaluateArgs:
    output_dir: str = option(
        "",
        "Where eval_results.json and generated_predictions.jsonl go (default: <model>/eval for a model dist_glm "
        "trained; required for any other; never a recipe's).",
    )
    per_device_eval_batch_size: int = option(8, "Samples per forward pass and per generate call.")
    predict_with_generate: bool = option(True, "Also generate a reply per sample and report ROUGE/BLEU/exact match.")
    generation_max_new_tokens: int = option(128, "Token budget per generated reply.")
    max_eval_samples: int = option(0, "Evaluate only the first N samples (0 = all).")


# Evaluation reads its data with the training pipeline; these DataConfig keys apply to it.
EVAL_DATA_KEYS = (
    "eval_dataset",
    "dataset_format",
    "prompt_column",
    "response_column",
    "template",
    "cutoff_len",
    "mask_history",
    "train_on_prompt",
    "on_invalid",
    "data_cache_dir",
)


EVALUATE = Command(
    prog="evaluate.py",
    usage="evaluate.py [RECIPE.yaml] --model_name_or_path=DIR --eval_dataset=FILE [--key=value ...]",
    sections={"model": (ModelArgs, None), "evaluate": (EvaluateArgs, None), "data": (DataConfig, EVAL_DATA_KEYS)},
    description="A training recipe (YAML) may come first; flags override it.",
    recipe_keys=TRAIN_KEYS,
    flag_only=("output_dir",),
)


def evaluate_artifact(model_args: ModelArgs, args: EvaluateArgs, data_cfg: DataConfig) -> dict:
    """Loss, perplexity and (predict_with_generate) ROUGE-1/2/L, BLEU-4 and exact match on the whole eval
    set, with the very functions the trainer evaluates with, so the numbers are comparable. Under a
    launcher each rank holds the whole model and takes a shard of the set; alone it is a world of one."""
    from dist_glm.data.preprocess import tokenize_dataset
    from dist_glm.data.sources import check_data_paths, named_sets
    from dist_glm.data.template import choose_template
    from dist_glm.models.artifacts import generation_eos_ids_of, load_artifact, resolve_artifact, resolve_dtype
    from dist_glm.models.loading import load_tokenizer

    art = resolve_artifact(model_args.model_name_or_path, model_args.adapter_name_or_path)
    from dist_glm.data.registry import resolve as resolve_datasets

    data_cfg = dataclasses.replace(data_cfg)  # resolved in place: keep the caller's
    problems = resolve_datasets(data_cfg)
    if not problems:  # an unresolved name would only be reported twice
        problems = check_data_paths(data_cfg.eval_dataset, "eval_dataset", named=True)
    sets = {} if problems else named_sets(data_cfg.eval_dataset)
    if len(sets) > 1:
        problems.append("eval_dataset: evaluate.py takes one eval set; run it once per set (--eval_dataset=FILE)")
    elif sets:  # one set, perhaps named: its files
        data_cfg = dataclasses.replace(data_cfg, eval_dataset=next(iter(sets.values())))
    if not data_cfg.eval_dataset:
        problems.append("eval_dataset is required; set it to one or more comma-separated jsonl/json files")
    for key in ("per_device_eval_batch_size", "generation_max_new_tokens"):
        if getattr(args, key) < 1:
            problems.append(f"{key}={getattr(args, key)} must be at least 1")
    if args.max_eval_samples < 0:
        problems.append(f"max_eval_samples={args.max_eval_samples} must be 0 (all samples) or a count of samples")
    if not args.output_dir and not (art.source / "config.yaml").is_file():
        # <model>/eval is for dist_glm's own training outputs; any other model directory is the user's, and a
        # command never writes into the model it reads.
        problems.append(
            f"output_dir is required here: '{art.source}' is not a dist_glm training output, and the results are "
            "not written into a model directory someone else made; pass --output_dir=DIR"
        )
    if problems:
        raise UserError(problems)
    out = Path(args.output_dir) if args.output_dir else art.source / "eval"

    rank, world = environment.init_distributed()
    device = environment.local_device()
    dtype = resolve_dtype(model_args.dtype, art, device, trust_remote_code=model_args.trust_remote_code)
    tokenizer = load_tokenizer(str(art.tokenizer_dir), model_args.trust_remote_code)
    model = load_artifact(art, dtype, device, trust_remote_code=model_args.trust_remote_code)
    collectives.log(
        f"loaded {art.source} ({art.method}, {str(dtype).removeprefix('torch.')}) on {device}, {world} rank(s)"
    )
    # The cache sits beside the eval file, shared with training's (same key for the same settings).
    data_cfg = dataclasses.replace(data_cfg, dataset=data_cfg.eval_dataset)
    template = choose_template(data_cfg.template, tokenizer, model.config.model_type)
    examples, stats = tokenize_dataset(
        data_cfg.eval_dataset,
        tokenizer,
        str(art.tokenizer_dir),
        template,
        data_cfg,
        args.max_eval_samples,
        collectives.log,
    )
    if not examples:
        raise UserError(f"eval_dataset: no usable samples ({stats.summary('eval_dataset')})")

    pad_id = tokenizer.pad_token_id
    record = eval_loss(model, examples, args.per_device_eval_batch_size, pad_id, device)
    predictions = []
    if args.predict_with_generate:
        eos_ids = generation_eos_ids_of(model, tokenizer)
        predictions, gen = predict(
            model,
            examples,
            tokenizer,
            args.per_device_eval_batch_size,
            args.generation_max_new_tokens,
            eos_ids,
            False,
            device,
        )
        record.update(gen)
    results = {
        **record,
        "eval/samples": len(examples),
        "model_name_or_path": model_args.model_name_or_path,
        "adapter_name_or_path": model_args.adapter_name_or_path,
        "eval_dataset": data_cfg.eval_dataset,
        "generation_max_new_tokens": args.generation_max_new_tokens,
    }
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval_results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        if predictions:
            with open(out / "generated_predictions.jsonl", "w", encoding="utf-8") as f:
                for e, p in zip(examples, predictions, strict=True):
                    prompt = tokenizer.decode(e.prompt_ids)
                    f.write(
                        json.dumps({"prompt": prompt, "prediction": p, "reference": e.reference}, ensure_ascii=False)
                    )
                    f.write("\n")
        collectives.log(
            ", ".join(f"{k.split('/')[1]}={v:.4f}" for k, v in record.items())
            + f" on {len(examples)} samples; written to {out}"
        )
    collectives.barrier()
    return results
