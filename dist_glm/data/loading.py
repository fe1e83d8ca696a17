"""A recipe's train and eval sets as tokenized examples: the template is chosen and checked against
the tokenizer's own, then each set is tokenized through the shared cache (dist_glm.data.preprocess)."""

import json
from pathlib import Path

from dist_glm import distributed
from dist_glm.data.preprocess import tokenize_dataset
from dist_glm.data.template import build_template, chat_template_mismatch, choose_template
from dist_glm.errors import UserError


def load_datasets(cfg, tokenizer) -> tuple[list, list]:
    """Collective. Tokenized train and eval examples; writes the skipped-rows report (rank 0)."""
    from transformers import AutoConfig

    log = distributed.log
    path = cfg.model.model_name_or_path
    model_type = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code).model_type
    template = choose_template(cfg.data.template, tokenizer, model_type)
    mismatch = chat_template_mismatch(build_template(template, tokenizer), tokenizer)
    log(
        f"chat template: {template}"
        + (f"; WARNING: {mismatch}" if mismatch else " (agrees with the tokenizer's own chat_template)")
    )
    train, stats = tokenize_dataset(cfg.data.dataset, tokenizer, path, template, cfg.data, cfg.data.max_samples, log)
    evaluation, eval_stats = [], None
    if cfg.data.eval_dataset:
        evaluation, eval_stats = tokenize_dataset(cfg.data.eval_dataset, tokenizer, path, template, cfg.data, 0, log)
    skipped = stats.skipped + (eval_stats.skipped if eval_stats else [])
    if skipped and distributed.is_main_process():  # one report, written once
        report = Path(cfg.train.output_dir) / "skipped_rows.jsonl"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in skipped), encoding="utf-8")
        log(f"{len(skipped)} invalid rows skipped (on_invalid=skip); every one is listed in {report}")
    if not train:
        raise UserError(f"dataset: no usable samples in {cfg.data.dataset} ({stats.summary('dataset')})")
    return train, evaluation
