"""A recipe's train and eval sets as tokenized examples: the template is chosen and checked against
the tokenizer's own, then each set is tokenized through the shared cache (dist_glm.data.preprocess)."""

import json
from dataclasses import dataclass
from pathlib import Path

from dist_glm.config import mix_probabilities, option
from dist_glm.data.packing import pack_examples
from dist_glm.data.preprocess import tokenize_dataset
from dist_glm.data.sources import named_sets, split_paths
from dist_glm.data.template import build_template, chat_template_mismatch, choose_template
from dist_glm.errors import UserError
from dist_glm.runtime import collectives

TRAINED_OPEN, TRAINED_CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧: rare in any data, so a marked span is unambiguous


@dataclass
class PrepareArgs:
    dump_samples: str = option(
        "",
        "Write every training sample to this new .jsonl file, in dataset order: text (decoded with its special "
        "tokens), input_ids and labels, to diff against a reference rendering.",
    )
    show_samples: int = option(
        0,
        f"Print the first N tokenized training samples with the trained spans marked {TRAINED_OPEN}...{TRAINED_CLOSE}.",
    )


def recipe_template(cfg, tokenizer) -> str:
    """The template name for the recipe's model (`template: auto` from its model type), checked against
    the tokenizer's own chat_template and logged."""
    path = cfg.model.model_name_or_path
    # The model type as config.json gives it ("chatglm" for THUDM's published ChatGLM layouts, whose tokenizer
    # tells them apart), read without transformers: remote-code configs need no code for this.
    config_file = Path(path) / "config.json"
    model_type = (
        json.loads(config_file.read_text(encoding="utf-8")).get("model_type", "") if config_file.is_file() else ""
    )
    template = choose_template(cfg.data.template, tokenizer, model_type)
    mismatch = chat_template_mismatch(build_template(template, tokenizer), tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        how = f" (the checkpoint has no chat_template to compare with; {cfg.data.template}: model_type {model_type})"
    else:
        how = f"; WARNING: {mismatch}" if mismatch else " (agrees with the tokenizer's own chat_template)"
    collectives.log(f"chat template: {template}{how}")
    return template


@dataclass
class Datasets:
    """A recipe's data as training steps over it."""

    train: list  # the rows of a step: packed rows when `packed`, else the samples themselves
    eval_sets: dict[str, list]  # name -> examples; one set named "" unless eval_dataset names them
    samples: list  # the tokenized training samples, before packing
    packed: bool  # the recipe's `packing`, its default resolved here (never written back into the config)


def resolve_packing(requested: bool | None, raw_text: bool, can_pack: bool, log) -> bool:
    """`packing` as given, else on for raw documents and off for conversations, unless the method trains
    one sample per row (its check_config has already refused an explicit packing=true)."""
    if requested is not None:
        return requested
    if raw_text and not can_pack:
        log("packing: off; raw text packs by default, but this method trains one sample per row")
        return False
    if raw_text:
        log("packing: on, the default for raw text (set packing=false to turn it off)")
    return raw_text


def load_datasets(cfg, tokenizer, can_pack: bool = True) -> Datasets:
    """Collective. The tokenized training samples, packed into rows when the recipe packs (`can_pack`: the
    method's), and the eval sets; writes the skipped-rows report (rank 0)."""
    log = collectives.log
    path = cfg.model.model_name_or_path
    template = recipe_template(cfg, tokenizer)
    if cfg.preference.enabled:
        return _load_pairs(cfg, tokenizer, template, log)
    if cfg.data.mix_probs:
        files, probs = split_paths(cfg.data.dataset), mix_probabilities(cfg.data.mix_probs)
        parts = [tokenize_dataset(f, tokenizer, path, template, cfg.data, cfg.data.max_samples, log) for f in files]
        stats = parts[0][1]
        for _, more in parts[1:]:
            stats = stats.merged(more)
        train = mix([examples for examples, _ in parts], probs, cfg.train.seed)
        shares = ", ".join(f"{f} {p:g}" for f, p in zip(files, probs, strict=True))
        log(f"mix_probs: {len(train)} samples per epoch drawn from {shares}")
    else:
        train, stats = tokenize_dataset(
            cfg.data.dataset, tokenizer, path, template, cfg.data, cfg.data.max_samples, log
        )
    packed = resolve_packing(cfg.data.packing, bool(train) and stats.text_samples == len(train), can_pack, log)
    evaluation, skipped = {}, list(stats.skipped)
    for name, files in named_sets(cfg.data.eval_dataset).items():
        evaluation[name], eval_stats = tokenize_dataset(files, tokenizer, path, template, cfg.data, 0, log)
        skipped += eval_stats.skipped
        if not evaluation[name]:
            raise UserError(f"eval_dataset: no usable samples in {files} ({eval_stats.summary('eval_dataset')})")
    if skipped and collectives.is_main_process():  # one report, written once
        report = Path(cfg.train.output_dir) / "skipped_rows.jsonl"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in skipped), encoding="utf-8")
        log(f"{len(skipped)} invalid rows skipped (on_invalid=skip); every one is listed in {report}")
    if not train:
        raise UserError(f"dataset: no usable samples in {cfg.data.dataset} ({stats.summary('dataset')})")
    if cfg.data.val_size:
        train, held = split_held_out(train, cfg.data.val_size, cfg.train.seed)
        evaluation = {"": held}
        log(
            f"val_size={cfg.data.val_size:g}: {len(held)} of {len(train) + len(held)} samples held out "
            f"for evaluation (seed {cfg.train.seed}; identical samples kept on one side)"
        )
    rows = pack_examples(train, cfg.data.cutoff_len) if packed else train
    if packed:
        log(f"packing: {len(train)} samples into {len(rows)} rows of up to {cfg.data.cutoff_len} tokens")
    return Datasets(rows, evaluation, train, packed)


def _load_pairs(cfg, tokenizer, template: str, log) -> Datasets:
    """stage=dpo / kto: the preference pairs or labelled answers, and the eval sets' (tokenized in memory; no
    cache or packing yet)."""
    from dist_glm.data.preference import load_feedback, load_pairs

    kto = cfg.preference.stage == "kto"
    load, what = (load_feedback, "labelled answers") if kto else (load_pairs, "preference pairs")
    skipped: list[dict] = []
    samples, counts = load(cfg.data.dataset, tokenizer, cfg.data, template, skipped, cfg.data.max_samples)
    evaluation = {}
    for name, files in named_sets(cfg.data.eval_dataset).items():
        evaluation[name], _ = load(files, tokenizer, cfg.data, template, skipped)
        if not evaluation[name]:
            raise UserError(f"eval_dataset: no usable {what} in {files}")
    if skipped:
        log(
            f"{len(skipped)} invalid rows skipped (on_invalid=skip); the first, {skipped[0]['where']}: "
            f"{skipped[0]['error']}"
        )
    if not samples:
        raise UserError(f"dataset: no usable {what} in {cfg.data.dataset}")
    if kto:
        # KTO's paper: the desirable and undesirable weights so that w_D * n_D / (w_U * n_U) lies in [1, 4/3].
        p, n_d = cfg.preference, counts["desirable"]
        ratio = p.kto_chosen_weight * n_d / max(p.kto_rejected_weight * (len(samples) - n_d), 1e-9)
        log(f"labelled answers: {len(samples)}, {n_d} desirable (weighted desirable : undesirable = {ratio:.3g}; "
            f"KTO's paper suggests 1 to 4/3, set by kto_chosen_weight / kto_rejected_weight), rendered with template "
            f"{template}")  # fmt: skip
    else:
        cut = (
            f", {counts['truncated']} pairs cut to fit cutoff_len={cfg.data.cutoff_len}" if counts["truncated"] else ""
        )
        log(f"preference pairs: {len(samples)} (chosen and rejected rendered with template {template}{cut})")
    if cfg.data.val_size:
        samples, evaluation[""] = split_held_out(samples, cfg.data.val_size, cfg.train.seed)
        log(f"val_size={cfg.data.val_size:g}: {len(evaluation[''])} held out for evaluation")
    return Datasets(samples, evaluation, samples, False)


def mix(sources: list[list], probs: list[float], seed: int) -> list:
    """One epoch of a mixture, as a list (so batching, ranks and resume treat it as any dataset): as many
    samples as all sources hold together, each source's share exactly its probability (largest
    remainder), the order of sources shuffled by `seed`, and each source's samples taken in a seeded
    permutation, cycled when a small source is drawn more often than it has samples."""
    import random

    total = sum(len(s) for s in sources)
    exact = [p * total for p in probs]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(probs)), key=lambda i: exact[i] - counts[i], reverse=True)[: total - sum(counts)]:
        counts[i] += 1
    rng = random.Random(seed)
    labels = [i for i, n in enumerate(counts) for _ in range(n)]
    rng.shuffle(labels)
    orders = []
    for s in sources:
        order = list(range(len(s)))
        rng.shuffle(order)
        orders.append(order)
    taken = [0] * len(sources)
    out = []
    for i in labels:
        if not sources[i]:
            continue  # an empty file with a non-zero share: tokenize_dataset has reported why
        out.append(sources[i][orders[i][taken[i] % len(sources[i])]])
        taken[i] += 1
    return out


def split_held_out(examples: list, val_size: float, seed: int) -> tuple[list, list]:
    """(train, held out), the same on every rank and every run with the same seed. Samples with identical
    token ids form one group that goes wholly to one side, so no conversation is trained on and evaluated
    on at once. A fraction rounds to the nearest count, at least 1; the training side keeps at least 1."""
    import random

    want = int(val_size) if val_size >= 1 else max(1, round(val_size * len(examples)))
    groups: dict[tuple, list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(tuple(e.input_ids), []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)  # insertion order is file order: deterministic before the shuffle
    held: set[int] = set()
    for members in order:
        if len(held) >= want:
            break
        if len(held) + len(members) < len(examples):
            held.update(members)
    if len(held) < want:
        raise UserError(
            f"val_size={val_size:g} asks for {want} held-out samples but dataset has {len(examples)} (in "
            f"{len(groups)} distinct ones); lower val_size"
        )
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def render_trained_spans(example, tokenizer) -> str:
    """The sample's text with every run of trained tokens (label != ignore) inside ⟦...⟧, special tokens
    shown, and the counts: what the loss sees, without reading the cache."""
    from itertools import groupby

    text = ""
    for trained, run in groupby(zip(example.input_ids, example.labels, strict=True), key=lambda t: t[1] != -100):
        piece = tokenizer.decode([token for token, _ in run])
        text += f"{TRAINED_OPEN}{piece}{TRAINED_CLOSE}" if trained else piece
    n_trained = sum(label != -100 for label in example.labels)
    return f"({len(example.input_ids)} tokens, {n_trained} trained)\n{text}"
