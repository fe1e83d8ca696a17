"""The reference model of preference training (stage=dpo, stage=kto), and the per-row log-probabilities
every preference loss is built from.

Where the reference log-probabilities come from, in this order:
- `ref_logps_cache=DIR`: precomputed once by `launch/ref_cache.py` (dist_glm.tools.ref_cache) over the
  recipe's rows, keyed by each row's tokens and labels like the distillation cache; training loads no
  reference model at all;
- `ref_model=DIR`: that model, frozen;
- LoRA / QLoRA: the policy itself with its adapter switched off (PEFT's `disable_adapter`; no second copy);
- otherwise a frozen copy of the model the policy starts from (`model_name_or_path`, with the adapter that
  `merge_adapter` merged into it), loaded like the distillation teacher: partitioned under ZeRO-3 in an
  optimizer-less engine.
ORPO and SimPO need none. The three give the same loss (tests/test_preference.py).
"""

from pathlib import Path

import torch
import torch.nn.functional as F

from dist_glm.data.batching import model_inputs
from dist_glm.data.template import IGNORE_INDEX
from dist_glm.errors import UserError
from dist_glm.objectives import row_cache
from dist_glm.objectives.cross_entropy import sum_over_labelled, sums_from_head, vocab_size_of
from dist_glm.objectives.row_cache import is_labelled, row_key
from dist_glm.runtime import collectives


def _chunk_row_logps(head_forward, hidden, targets, rows, n_rows):
    """Per-row sums of the target tokens' log-probabilities in one chunk of labelled positions."""
    logps = -F.cross_entropy(head_forward(hidden).float(), targets, reduction="none")
    return torch.zeros(n_rows, device=logps.device, dtype=logps.dtype).index_add(0, rows, logps)


def row_logps(model, batch: dict) -> torch.Tensor:
    """Each row's summed log-probability of its labelled tokens (fp32, one value per row). Needs a model
    whose LM head runs on batch-first hidden states (checked when the objective is built)."""
    labels = batch["labels"]
    n = labels.shape[0]
    rows_of = torch.arange(n, device=labels.device).unsqueeze(1).expand(n, labels.shape[1] - 1)
    rows = rows_of[labels[:, 1:] != IGNORE_INDEX]
    chunk = max(1, 2**25 // vocab_size_of(model))

    def compute(head, hidden):
        return sum_over_labelled(_chunk_row_logps, head, hidden, labels, chunk, (rows,), (n,), (n,))

    return sums_from_head(model, model_inputs(batch), compute, n)


def reference_logps(reference, model, batch: dict) -> torch.Tensor | None:
    """Each row's reference log-probability: the batch's own `ref_logps` (collated from a cache), or
    `row_logps` under the reference `load_reference` chose: None (no reference), "adapter" (the policy with
    its adapter switched off: a PEFT model) or a frozen model."""
    if "ref_logps" in batch:
        return batch["ref_logps"]
    if reference is None:
        return None
    with torch.no_grad():
        if reference == "adapter":
            with getattr(model, "module", model).disable_adapter():
                return row_logps(model, batch)
        return row_logps(reference, batch)


def reference_source(cfg) -> dict:
    """What a frozen reference (or a cache of one) is: ref_model, or the model the policy starts from."""
    p, m = cfg.preference, cfg.model
    if p.ref_model:
        return {"reference": str(Path(p.ref_model).resolve()), "adapter": ""}
    adapter = m.adapter_name_or_path if m.merge_adapter else ""
    return {
        "reference": str(Path(m.model_name_or_path).resolve()),
        "adapter": str(Path(adapter).resolve()) if adapter else "",
    }


def read_manifest(cfg) -> dict:
    """The cache's manifest, checked against this run's reference (before launch)."""
    path = cfg.preference.ref_logps_cache
    manifest = row_cache.read_manifest(path, "ref_logps_cache", "python launch/ref_cache.py")
    want = reference_source(cfg)
    if {k: manifest.get(k) for k in want} != want:
        raise UserError(
            f"ref_logps_cache='{path}' holds the log-probabilities of '{manifest.get('reference')}', but this run's "
            f"reference is '{want['reference']}'{' + ' + want['adapter'] if want['adapter'] else ''}; rebuild it "
            "with this recipe"
        )
    return manifest


class CachedReference:
    """Reference log-probabilities read from a cache, looked up by row key as batches are collated."""

    def __init__(self, cfg):
        self.path = cfg.preference.ref_logps_cache
        # Checked against this run's reference before launch (check_objective): here the config may already name
        # the merged base that merge_adapter wrote, which the cache holds as base + adapter.
        self.manifest = row_cache.read_manifest(self.path, "ref_logps_cache", "python launch/ref_cache.py")
        self.entries: dict[str, float] = row_cache.load_entries(self.path)
        collectives.log(
            f"preference: reference log-probabilities from {self.path} ({self.manifest['reference']}, "
            f"{len(self.entries)} rows); no reference model loaded"
        )

    def check(self, rows) -> None:
        missing = sum(1 for r in rows if is_labelled(r) and row_key(r) not in self.entries)
        if missing:
            raise UserError(
                f"ref_logps_cache='{self.path}': {missing} of this run's rows are not in it (other data, template "
                "or cutoff_len than when it was built); rebuild it with launch/ref_cache.py and this recipe"
            )

    def logps(self, rows) -> torch.Tensor:
        """One value per row; 0 for a row with nothing labelled (an evaluation padding slot)."""
        return torch.tensor([self.entries[row_key(r)] if is_labelled(r) else 0.0 for r in rows], dtype=torch.float32)


def attach(reference, batch: dict, rows) -> dict:
    """A cached reference's log-probabilities of `rows` (the batch's rows, in order) as `batch["ref_logps"]`."""
    if isinstance(reference, CachedReference):
        batch["ref_logps"] = reference.logps(rows)
    return batch


def load_frozen(cfg, ds_config: dict, device):
    """Collective under ZeRO-3: the frozen reference (reference_source), partitioned and wrapped in an
    optimizer-less engine under ZeRO-3, as the distillation teacher; on this device otherwise."""
    import deepspeed

    from dist_glm.models.artifacts import load_artifact, resolve_artifact
    from dist_glm.objectives.teacher import per_rank_gib, teacher_ds_config
    from dist_glm.runtime import deepspeed_config

    source = reference_source(cfg)
    zero3 = deepspeed_config.zero_stage(ds_config) == 3
    tds = teacher_ds_config(ds_config, cfg.train.dtype) if zero3 else None
    art = resolve_artifact(source["reference"], source["adapter"])
    module = load_artifact(
        art, cfg.train.dtype, device, partition_with=tds, trust_remote_code=cfg.model.trust_remote_code
    )
    module.requires_grad_(False)
    module.eval()
    if zero3:
        module, *_ = deepspeed.initialize(model=module, config=tds)
        module.eval()
    share = collectives.all_gather_objects(per_rank_gib(module))
    collectives.log(
        f"preference: reference model {source['reference']}{' + ' + source['adapter'] if source['adapter'] else ''} "
        f"(frozen, no optimizer state): weights per rank {', '.join(f'{g:.3g}' for g in share)} GiB"
    )
    return module


def _adapter_switches_off(policy) -> bool:
    """A PEFT model whose adapter switches off to give its base exactly (LoRA, QLoRA). A prompt-learning one
    (P-tuning v2's prefix) does not: its position hook counts the prefix's mask columns, which are absent with
    the prefix off, and its random initial prefix means the policy never started at the base anyway; it takes
    a frozen copy of the base."""
    config = getattr(policy, "peft_config", {}).get("default")
    return hasattr(policy, "disable_adapter") and not getattr(config, "is_prompt_learning", False)


def load_reference(cfg, policy, ds_config: dict, device):
    """Collective under ZeRO-3. Where the reference log-probabilities come from (the module's docstring):
    None, a CachedReference, "adapter" or a frozen model."""
    p = cfg.preference
    if not p.needs_reference:
        collectives.log(f"preference: {p.pref_loss} needs no reference model")
        return None
    if p.ref_logps_cache:
        return CachedReference(cfg)
    if not p.ref_model and _adapter_switches_off(policy):
        collectives.log("preference: the reference is the base model with the adapter switched off (no second copy)")
        return "adapter"
    if not p.ref_model and cfg.model.train_from_scratch:
        raise UserError(
            f"train_from_scratch with stage={p.stage}: the frozen reference would load model_name_or_path's weights, "
            "not the random start; preference training continues a trained model: set train_from_scratch=false"
        )
    return load_frozen(cfg, ds_config, device)
