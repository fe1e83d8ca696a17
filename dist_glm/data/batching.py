"""Tokenised datasets, padding, and the global-batch sampler that makes every split equivalent.

The sampler fixes the *global* batch of each optimizer step from (seed, epoch) alone; ranks and
accumulation micro-steps only decide who computes which slice of it. So 1 rank x micro-batch 4,
2 ranks x micro-batch 2 and 1 rank x micro-batch 2 x accumulation 2 see exactly the same samples per
step, and resuming at step N needs no replay: the position is a function of N.
"""

import itertools
import json
from dataclasses import dataclass, field

import numpy as np
import torch

from dist_glm.data.converters import count_empty_turns, load_conversations
from dist_glm.data.template import IGNORE_INDEX, build_template
from dist_glm.data.thinking import ALWAYS_THINKING, FORMATS
from dist_glm.errors import UserError


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int]  # for generation: the prompt only
    reference: str  # the reply text, for generation metrics
    position_ids: list[int] | None = None  # set on packed rows: restarts at 0 for every sample

    def masked(self) -> "Example":
        """The same tokens with nothing labelled: an evaluation padding slot (compute, but no loss)."""
        return Example(self.input_ids, [IGNORE_INDEX] * len(self.input_ids), [], "")


@dataclass
class Samples:
    """Samples as the flat arrays the cache stores: sample i is input_ids/labels[offsets[i]:offsets[i + 1]]
    and prompt_ids[prompt_offsets[i]:prompt_offsets[i + 1]]. Tokenizing workers send these back (a few
    buffers per chunk instead of a Python object per token), and the cache is written from them as they are."""

    input_ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    prompt_ids: np.ndarray
    prompt_offsets: np.ndarray
    references: list

    @staticmethod
    def of(examples: list) -> "Samples":
        """From anything with input_ids, labels, prompt_ids and reference (Encoded, Example)."""
        flat = itertools.chain.from_iterable

        def lengths(key):
            return np.cumsum([0] + [len(getattr(e, key)) for e in examples], dtype=np.int64)

        return Samples(
            np.fromiter(flat(e.input_ids for e in examples), dtype=np.int32),
            np.fromiter(flat(e.labels for e in examples), dtype=np.int32),
            lengths("input_ids"),
            np.fromiter(flat(e.prompt_ids for e in examples), dtype=np.int32),
            lengths("prompt_ids"),
            [e.reference for e in examples],
        )

    @staticmethod
    def joined(parts: list["Samples"], keep: np.ndarray) -> "Samples":
        """The samples of `parts` in order, only those `keep` (one bool per sample) marks."""

        def cat(key, dtype):
            return np.concatenate([getattr(p, key) for p in parts]) if parts else np.zeros(0, dtype)

        def kept(key, offsets_key):
            lengths = np.concatenate([np.diff(getattr(p, offsets_key)) for p in parts]) if parts else np.zeros(0, int)
            tokens = cat(key, np.int32)[np.repeat(keep, lengths)]
            return tokens, np.concatenate([[0], np.cumsum(lengths[keep])]).astype(np.int64)

        ids, offsets = kept("input_ids", "offsets")
        labels, _ = kept("labels", "offsets")
        prompt, prompt_offsets = kept("prompt_ids", "prompt_offsets")
        references = [r for p in parts for r in p.references]
        return Samples(
            ids, labels, offsets, prompt, prompt_offsets, [r for r, k in zip(references, keep, strict=True) if k]
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, i: int) -> Example:
        return example_at(vars(self), i, self.references[i])


def example_at(arrays, i: int, reference: str) -> Example:
    """Sample i of flat arrays (Samples' fields, or a cache's memory-mapped files) as an Example."""
    lo, hi = int(arrays["offsets"][i]), int(arrays["offsets"][i + 1])
    plo, phi = int(arrays["prompt_offsets"][i]), int(arrays["prompt_offsets"][i + 1])
    return Example(
        arrays["input_ids"][lo:hi].tolist(),
        arrays["labels"][lo:hi].tolist(),
        arrays["prompt_ids"][plo:phi].tolist(),
        reference,
    )


@dataclass
class DataStats:
    rows: int = 0
    samples: int = 0
    truncated: int = 0
    dropped_no_labels: int = 0  # nothing left to train on (e.g. an empty reply)
    skipped: list = field(default_factory=list)  # bad rows skipped under on_invalid: skip
    with_empty_turns: int = 0  # rows with an empty user or assistant turn (trained as given)
    text_samples: int = 0  # samples from raw documents (dataset_format text)
    files: dict = field(default_factory=dict)  # path -> {"format", "rows", "samples"}
    lost: dict = field(default_factory=dict)  # what truncation cost: kind -> [count, first few file:line]
    expanded: int = 0  # extra samples for earlier rounds whose reasoning the format hides (reasoning_history)

    def note_lost(self, kind: str, where: str) -> None:
        count, first = self.lost.get(kind, [0, []])
        self.lost[kind] = [count + 1, first + [where] if len(first) < 3 else first]

    def merged(self, other: "DataStats") -> "DataStats":
        return DataStats(
            self.rows + other.rows,
            self.samples + other.samples,
            self.truncated + other.truncated,
            self.dropped_no_labels + other.dropped_no_labels,
            self.skipped + other.skipped,
            self.with_empty_turns + other.with_empty_turns,
            self.text_samples + other.text_samples,
            {**self.files, **other.files},
            {k: [self.lost.get(k, [0, []])[0] + other.lost.get(k, [0, []])[0],
                 (self.lost.get(k, [0, []])[1] + other.lost.get(k, [0, []])[1])[:3]]
             for k in {**self.lost, **other.lost}},
            self.expanded + other.expanded,
        )  # fmt: skip

    def summary(self, name: str) -> str:
        empty = (
            f"; WARNING: {self.with_empty_turns} rows have an empty user or assistant turn (trained as given)"
            if self.with_empty_turns
            else ""
        )
        per_file = "; ".join(
            f"{path.rsplit('/', 1)[-1]} ({f['format']}): {f['rows']} rows -> {f['samples']} samples"
            for path, f in self.files.items()
        )
        what = {
            "question": "lost the end of their prompt (the last user turn)",
            "reply": "had their trained reply cut short",
            "tool_call": "were dropped: their tool call did not fit (a cut call is broken JSON)",
        }
        lost = "; ".join(
            f"{self.lost[k][0]} {what[k]} (e.g. {', '.join(self.lost[k][1])})" for k in what if k in self.lost
        )
        lost = (
            f"; WARNING: cutoff_len is too short for some samples: {lost}; raise cutoff_len or shorten them"
            if lost
            else ""
        )
        expanded = (
            f"; {self.expanded} more samples for earlier rounds whose reasoning the chat format hides "
            "(reasoning_history=expand: each thought trained once, as the model saw it)"
            if self.expanded
            else ""
        )
        lost = expanded + lost
        return (
            f"{name}: {self.rows} rows -> {self.samples} samples; "
            f"{self.truncated} truncated to cutoff_len, {self.dropped_no_labels} dropped with no trainable "
            f"token, {len(self.skipped)} invalid rows skipped{empty}{lost}" + (f" [{per_file}]" if per_file else "")
        )


def _encode_chunk_here(template, tokenizer, conversations: list[dict], cutoff_len: int) -> tuple[list[tuple], Samples]:
    """(one entry per conversation, their samples as flat arrays). An entry is ("text", pieces) or ("chat",
    truncated, lost, has_empty_turns, has_labels); a chat conversation gives one sample, a document `pieces`."""
    meta, samples = [], []
    for conv in conversations:
        if "text" in conv:
            pieces = document_pieces(template, tokenizer, conv["text"], cutoff_len)
            meta.append(("text", len(pieces)))
            samples += pieces
            continue
        enc = template.encode(conv, cutoff_len)
        has_labels = any(label != IGNORE_INDEX for label in enc.labels[1:])
        meta.append(("chat", enc.truncated, enc.lost, count_empty_turns(conv) > 0, has_labels))
        samples.append(enc)
    return meta, Samples.of(samples)


_WORKER: dict = {}  # the forked workers' template and tokenizer (inherited, never pickled)


def _encode_chunk(bounds: tuple[int, int]) -> tuple[list[tuple], Samples]:
    w = _WORKER
    conversations = w["conversations"][bounds[0] : bounds[1]]
    return _encode_chunk_here(w["template"], w["tokenizer"], conversations, w["cutoff_len"])


def _encode_parallel(template, tokenizer, conversations: list[dict], cutoff_len: int, workers: int):
    """`workers` forked processes encode contiguous chunks; results keep the file order, so the cache
    is identical to a single process's. Returns [(entries, Samples)] per chunk."""
    import multiprocessing

    if workers <= 1 or len(conversations) < 2 * workers:
        return [_encode_chunk_here(template, tokenizer, conversations, cutoff_len)]
    _WORKER.update(template=template, tokenizer=tokenizer, conversations=conversations, cutoff_len=cutoff_len)
    step = -(-len(conversations) // (workers * 4))  # a few chunks per worker balance uneven lengths
    bounds = [(i, i + step) for i in range(0, len(conversations), step)]
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            return pool.map(_encode_chunk, bounds)
    finally:
        _WORKER.clear()


def _check_thinking_switch(data_cfg, template_name: str) -> None:
    """enable_thinking (the run's or a dataset's) means something only to a format with a thinking mode; on
    another it would be ignored without a word."""
    registered = json.loads(getattr(data_cfg, "dataset_columns", "") or "{}")
    off = [f"dataset_info.json's entry for {f}" for f, m in registered.items() if m.get("enable_thinking") is False]
    if getattr(data_cfg, "enable_thinking", None) is False:
        off.insert(0, "enable_thinking")
    switchable = [f for f in FORMATS if f not in ALWAYS_THINKING]
    if off and template_name not in switchable:
        what = "always thinks" if template_name in ALWAYS_THINKING else "has no thinking mode"
        raise UserError(
            f"{off[0]}: enable_thinking=false, but template {template_name} {what}; use a format that can switch "
            f"thinking off ({', '.join(switchable)}) or drop the switch"
        )


def check_reasoning_is_rendered(conversations: list[dict], template_name: str) -> None:
    """A template without thinking writes no reasoning: rows that carry it would train their answers without
    the thought they were written after, and the user would not know."""
    if template_name in FORMATS:
        return
    carrying = [c["where"] for c in conversations if any((m.get("reasoning") or "").strip() for m in c["messages"])]
    if carrying:
        raise UserError(
            f"{carrying[0]}: an assistant turn carries reasoning_content ({len(carrying)} rows do), which template "
            f"{template_name} does not write, so it would not be trained; use a thinking format "
            f"({', '.join(FORMATS)}) or remove the reasoning"
        )


def build_samples(
    spec: str, tokenizer, data_cfg, template_name: str, max_samples: int = 0
) -> tuple[Samples, DataStats]:
    template = build_template(
        template_name, tokenizer, data_cfg.mask_history, data_cfg.train_on_prompt,
        getattr(data_cfg, "reasoning_history", "expand"),
    )  # fmt: skip
    _check_thinking_switch(data_cfg, template_name)
    stats, formats = DataStats(), {}
    conversations = load_conversations(spec, data_cfg, stats.skipped, formats)
    stats.rows = len(conversations) + len(stats.skipped)
    stats.files = {path: {"format": fmt, "rows": 0, "samples": 0} for path, fmt in formats.items()}
    for where in [c["where"] for c in conversations] + [s["where"] for s in stats.skipped]:
        stats.files[where.rsplit(":", 1)[0]]["rows"] += 1
    workers = getattr(data_cfg, "preprocessing_num_workers", 1)
    if max_samples:  # of each file, as LLaMA-Factory caps each dataset: rows past a file's cap are not encoded
        conversations = _first_of_each_file(conversations, max_samples)
    check_reasoning_is_rendered(conversations, template_name)
    rows = len(conversations)
    conversations = [c for conv in conversations for c in template.expand(conv)]
    stats.expanded = len(conversations) - rows
    chunks = _encode_parallel(template, tokenizer, conversations, data_cfg.cutoff_len, workers)
    keep = []
    entries = (entry for meta, _ in chunks for entry in meta)
    for conv, entry in zip(conversations, entries, strict=True):
        where = conv["where"]
        source = where.rsplit(":", 1)[0]
        if entry[0] == "text":
            pieces = entry[1]
            taken = min(pieces, max_samples - stats.files[source]["samples"]) if max_samples else pieces
            stats.text_samples += taken
            stats.files[source]["samples"] += taken
            keep += [True] * taken + [False] * (pieces - taken)
            continue
        _, truncated, lost, empty_turns, has_labels = entry
        stats.with_empty_turns += empty_turns
        stats.truncated += truncated
        if "reply" in lost and [m for m in conv["messages"] if m["role"] == "assistant"][-1].get("tool_call"):
            stats.note_lost("tool_call", where)  # half a call would teach broken JSON: not trained on
            keep.append(False)
            continue
        for kind in lost:
            if kind != "rounds":  # dropping the oldest rounds is the intended way to fit
                stats.note_lost(kind, where)
        if not has_labels:
            stats.dropped_no_labels += 1
            keep.append(False)
            continue
        keep.append(True)
        stats.files[source]["samples"] += 1
    samples = Samples.joined([s for _, s in chunks], np.array(keep, dtype=bool))
    stats.samples = len(samples)
    return samples, stats


def build_examples(
    spec: str, tokenizer, data_cfg, template_name: str, max_samples: int = 0
) -> tuple[list[Example], DataStats]:
    """build_samples, one Example each (for callers that want them in memory)."""
    samples, stats = build_samples(spec, tokenizer, data_cfg, template_name, max_samples)
    return [samples.example(i) for i in range(len(samples))], stats


def _first_of_each_file(conversations: list[dict], n: int) -> list[dict]:
    """The first `n` rows of each file, in order (a raw document may still make several samples: those
    are cut at `n` per file where they are counted)."""
    taken: dict[str, int] = {}
    out = []
    for conv in conversations:
        source = conv["where"].rsplit(":", 1)[0]
        if taken.get(source, 0) < n:
            taken[source] = taken.get(source, 0) + 1
            out.append(conv)
    return out


def document_pieces(template, tokenizer, text: str, cutoff_len: int) -> list[Example]:
    """A raw document for continued pre-training, as GLM's own tokenizer builds plain text ([gMASK]<sop> +
    text) plus EOS to end it, every token trained; a document longer than cutoff_len is split into
    consecutive pieces (nothing is dropped; packing then fills rows with them)."""
    ids = list(template.document_prefix) + tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return [Example(ids[i : i + cutoff_len], ids[i : i + cutoff_len], [], "") for i in range(0, len(ids), cutoff_len)]


def sample_lengths(examples) -> list[int]:
    """Tokens per sample; a memory-mapped cache answers from its offsets without reading the rows."""
    if hasattr(examples, "lengths"):
        return examples.lengths()
    return [len(e.input_ids) for e in examples]


def pad_share(examples: list[Example], sampler: "GlobalBatchSampler") -> float:
    """Share of pad tokens in one epoch of this sampler's micro-batches (all ranks' micro-batches). A sample
    may be several rows of a batch (a preference pair: its chosen and rejected rows, each padded)."""
    real = padded = 0
    rows = getattr(examples[0], "rows", None) if len(examples) else None
    row_lengths = [[len(r.input_ids) for r in e.rows] for e in examples] if rows else None
    all_lengths = sample_lengths(examples) if rows is None else None
    for step in range(sampler.steps_per_epoch):
        for rank in range(sampler.world):
            for idx in sampler.micro_batches(step, rank):
                lengths = [all_lengths[i] for i in idx] if rows is None else [n for i in idx for n in row_lengths[i]]
                real, padded = real + sum(lengths), padded + max(lengths) * len(lengths)
    return 1 - real / max(padded, 1)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row. `token_mask` marks real tokens (for throughput counts). Unpacked
    rows get a 2-D `attention_mask`; packed rows get `position_ids` instead, from which the model
    builds its block-diagonal mask (a 2-D mask would switch that off)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    packed = examples[0].position_ids is not None
    # Padding in a packed row is a segment of its own (positions from 0), so it attends to no sample.
    positions = torch.arange(width).repeat(len(examples), 1) if packed else None
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
        if packed:
            positions[i, :n] = torch.tensor(e.position_ids)
            positions[i, n:] = torch.arange(width - n)
    batch = {"input_ids": ids, "labels": labels, "token_mask": mask}
    if packed:
        batch["position_ids"] = positions
    else:
        batch["attention_mask"] = mask
    return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """Forward arguments for a loss computation. use_cache=False matters beyond saving memory: with a KV
    cache present transformers skips the packed-sequence mask, and packed samples would see each other."""
    return {"use_cache": False, **{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}}


# group_by_length sorts this many global batches' worth of samples at a time (as HF's LengthGroupedSampler
# sorts megabatches of 50 batches): enough to find similar lengths, few enough to keep the order random.
GROUP_WINDOW = 50


class GlobalBatchSampler:
    """Indices of the micro-batches that one rank computes for one optimizer step.

    The samples of each step (the global batch) depend only on the seed, the epoch and the global batch
    size, never on how it is split over ranks, micro-batches and accumulation: with the loss normalised
    by the global trainable-token count, every split computes the same step. `lengths` turns on
    group_by_length: each window of GROUP_WINDOW global batches is sorted by length and cut into global
    batches, whose order within the window is shuffled, and each global batch is sorted, so a
    micro-batch holds samples of similar length (less padding) while each step's samples stay the same
    for every split."""

    def __init__(self, num_samples: int, micro_batch: int, grad_accum: int, world_size: int, seed: int, lengths=None):
        self.n, self.mbs, self.gas, self.world, self.seed = num_samples, micro_batch, grad_accum, world_size, seed
        self.global_batch = micro_batch * grad_accum * world_size
        # Drop the ragged tail of each epoch, so every step has the same global batch size.
        self.steps_per_epoch = num_samples // self.global_batch
        self.lengths = None if lengths is None else torch.as_tensor(lengths, dtype=torch.long)
        self._cached: tuple[int, torch.Tensor] | None = None

    def _order(self, epoch: int) -> torch.Tensor:
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        order = torch.randperm(self.n, generator=g)
        if self.lengths is not None:
            order = self._grouped(order[: self.steps_per_epoch * self.global_batch], g)
        self._cached = (epoch, order)
        return order

    def _grouped(self, order: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        windows = []
        for window in order.split(GROUP_WINDOW * self.global_batch):
            # Longest first, ties in the random order (a stable sort), cut into global batches.
            by_length = window[torch.sort(self.lengths[window], descending=True, stable=True).indices]
            batches = by_length.view(-1, self.global_batch)
            windows.append(batches[torch.randperm(len(batches), generator=g)].flatten())
        return torch.cat(windows) if windows else order

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Step counts from 0. Micro-step m of rank r takes slice (m * world + r) of the global batch."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        order = self._order(epoch)[pos * self.global_batch : (pos + 1) * self.global_batch].tolist()
        return [
            order[(m * self.world + rank) * self.mbs : (m * self.world + rank + 1) * self.mbs] for m in range(self.gas)
        ]
