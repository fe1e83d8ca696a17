"""Evaluation, during training and as a command (launch/evaluate.py): loss/perplexity on an eval set
and, optionally, generation metrics, with the same functions in both, so the numbers are comparable.

`eval_loss` and `predict` take any nn.Module (a DeepSpeed engine is one) and leave it in the mode they
found it in. Both are collectives. Every rank runs the same number of forward passes (ZeRO-3 gathers
weights inside each forward, so a rank that stopped early would hang the others): the eval set is split
into equal shards, and padding slots in the last shard carry no labels and no weight.
"""

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_glm import distributed
from dist_glm.artifacts import ModelArgs
from dist_glm.config import TRAIN_KEYS, Command, DataConfig, option
from dist_glm.data.batching import Example
from dist_glm.errors import UserError
from dist_glm.loss import CrossEntropy, count_trainable_tokens
from dist_glm.metrics import generation_metrics


@dataclass
class EvaluateArgs:
    output_dir: str = option(
        "", "Where eval_results.json and generated_predictions.jsonl go (default: <model>/eval; never a recipe's)."
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


def _generator(model):
    """The module that has `generate`: a DeepSpeed engine wraps the HF model it trains."""
    from deepspeed import DeepSpeedEngine

    return model.module if isinstance(model, DeepSpeedEngine) else model


def _shard(n: int, rank: int, world: int) -> list[int | None]:
    per_rank = math.ceil(n / world)
    idx = list(range(rank * per_rank, min(n, (rank + 1) * per_rank)))
    return idx + [None] * (per_rank - len(idx))  # None = padding slot


def _batches(slots: list, size: int):
    for i in range(0, len(slots), size):
        yield slots[i : i + size]


@torch.no_grad()
def eval_loss(model, examples: list[Example], batch_size: int, pad_id: int, device, objective=None) -> dict[str, float]:
    """Mean per trainable token of what the objective evaluates: `eval/loss` (cross-entropy) and, when
    distilling, `eval/kl_to_teacher`. Collective."""
    objective = objective or CrossEntropy()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    was_training = model.training
    model.eval()
    sums, tokens = {}, 0
    for slot_batch in _batches(_shard(len(examples), rank, world), batch_size):
        # A padding slot repeats example 0 with every label masked, so it costs compute but no loss.
        batch_examples = [
            examples[i]
            if i is not None
            else Example(examples[0].input_ids, [-100] * len(examples[0].input_ids), [], "")
            for i in slot_batch
        ]
        batch = {k: v.to(device) for k, v in objective.collate(batch_examples, pad_id).items()}
        for name, s in objective.eval_sums(model, batch).items():
            sums[name] = sums.get(name, 0.0) + float(s)
        tokens += count_trainable_tokens(batch["labels"])
    model.train(was_training)
    names = sorted(sums)
    *totals, total_tokens = distributed.all_reduce_sum([sums[n] for n in names] + [tokens]).tolist()
    means = {name: total / max(total_tokens, 1) for name, total in zip(names, totals, strict=True)}
    loss = means.pop("loss")
    record = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}
    record.update({f"eval/{name}": value for name, value in means.items()})
    return record


@torch.no_grad()
def predict(
    model,
    examples: list[Example],
    tokenizer,
    batch_size: int,
    max_new_tokens: int,
    eos_ids: list[int],
    synced_gpus: bool,
    device,
) -> tuple[list[str], dict[str, float]]:
    """Greedy generation for the whole eval set; returns (predictions in input order, metrics)."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    was_training = model.training
    model.eval()
    generator = _generator(model)
    pad_id = tokenizer.pad_token_id
    local = []
    for slot_batch in _batches(_shard(len(examples), rank, world), batch_size):
        prompts = [examples[i if i is not None else 0].prompt_ids for i in slot_batch]
        width = max(len(p) for p in prompts)
        # Left padding so that every prompt ends where generation starts.
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = generator.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_ids,
            pad_token_id=pad_id,
            use_cache=True,
            synced_gpus=synced_gpus,
        )
        for i, row in zip(slot_batch, out[:, width:].tolist(), strict=True):
            if i is not None:
                cut = next((j for j, t in enumerate(row) if t in eos_ids), len(row))
                # GLM replies start with the newline that follows <|assistant|>; it is not part of the answer.
                local.append((i, tokenizer.decode(row[:cut], skip_special_tokens=True).removeprefix("\n")))
    model.train(was_training)
    # Gathering Python objects is fine here: predictions are short strings, gathered once per eval.
    merged = sorted(p for part in distributed.all_gather_objects(local) for p in part)
    predictions = [text for _, text in merged]
    metrics = generation_metrics(predictions, [e.reference for e in examples])
    return predictions, {f"eval/{k}": v for k, v in metrics.items()}


def evaluate_artifact(model_args: ModelArgs, args: EvaluateArgs, data_cfg: DataConfig) -> dict:
    """Loss, perplexity and (predict_with_generate) ROUGE-1/2/L, BLEU-4 and exact match on the whole eval
    set, with the very functions the trainer evaluates with, so the numbers are comparable. Under a
    launcher each rank holds the whole model and takes a shard of the set; alone it is a world of one."""
    from dist_glm.artifacts import generation_eos_ids_of, load_artifact, resolve_artifact, resolve_dtype
    from dist_glm.data.formats import check_data_paths, named_sets
    from dist_glm.data.preprocess import tokenize_dataset
    from dist_glm.data.template import choose_template
    from dist_glm.models import load_tokenizer

    art = resolve_artifact(model_args.model_name_or_path, model_args.adapter_name_or_path)
    from dist_glm.data.registry import resolve as resolve_datasets

    data_cfg = dataclasses.replace(data_cfg)  # resolved in place: keep the caller's
    problems = resolve_datasets(data_cfg)
    problems += check_data_paths(data_cfg.eval_dataset, "eval_dataset", named=True)
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
    if problems:
        raise UserError(problems)
    out = Path(args.output_dir) if args.output_dir else art.source / "eval"

    rank, world = distributed.init_distributed()
    device = distributed.local_device()
    dtype = resolve_dtype(model_args.dtype, art, device)
    tokenizer = load_tokenizer(str(art.tokenizer_dir), model_args.trust_remote_code)
    model = load_artifact(art, dtype, device)
    distributed.log(
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
        distributed.log,
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
        distributed.log(
            ", ".join(f"{k.split('/')[1]}={v:.4f}" for k, v in record.items())
            + f" on {len(examples)} samples; written to {out}"
        )
    distributed.barrier()
    return results
