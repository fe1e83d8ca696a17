"""Preference training (`stage: dpo`): DPO and its IPO, hinge, ORPO and SimPO variants on pairs of answers
to one prompt, each loss written from its paper (LLaMA-Factory's key names: `pref_loss`, `pref_beta`,
`pref_ftx`, `simpo_gamma`).

A pair is two samples, the chosen and the rejected answer after the same prompt, collated as one batch of
2B rows (chosen first). Each row's log-probability is summed at its labelled tokens only, with the LM head
applied there in chunks (`cross_entropy.sum_over_labelled`): no B x T x V logits, for the policy or the
reference. The reference is the policy's own base with its adapter switched off (LoRA / QLoRA: no second
copy), a frozen copy loaded like the distillation teacher (full / freeze; partitioned under ZeRO-3), or
none (ORPO and SimPO need none).

Every loss here is a sum over pairs, and `count` is the pairs in a batch: the loop divides by the global
number of pairs, so 1 rank x 4 pairs, 2 ranks x 2 and accumulation give the same step.
"""

import torch
import torch.nn.functional as F

from dist_glm.data.batching import collate, model_inputs
from dist_glm.data.template import IGNORE_INDEX
from dist_glm.errors import UserError
from dist_glm.objectives.cross_entropy import has_native_head, sum_over_labelled, sums_from_head, vocab_size_of

# The losses on the mean log-probability per token (ORPO's and SimPO's papers define theirs on it; for IPO,
# whose paper uses sequence log-likelihoods, it is TRL's and LLaMA-Factory's choice, kept here so the numbers
# compare). Which losses need a reference model: PreferenceConfig.needs_reference.
LENGTH_NORMALISED = ("ipo", "orpo", "simpo")
PARTS = (
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
)  # fmt: skip


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


def check_head(policy, stage: str) -> None:
    if policy is not None and not has_native_head(policy):
        raise UserError(
            f"stage={stage}: this model's code (remote code) computes its LM head in its own layout, which the "
            "per-answer log-probabilities cannot use yet; ChatGLM2/3 and glm-4-9b-chat load without remote code "
            "(trust_remote_code: false), or train stage=sft"
        )


def reference_logps(reference, model, batch: dict) -> torch.Tensor | None:
    """`row_logps` under the reference `load_reference` chose: None (no reference), "adapter" (the policy
    with its adapter switched off: a PEFT model) or a frozen model."""
    if reference is None:
        return None
    with torch.no_grad():
        if reference == "adapter":
            with getattr(model, "module", model).disable_adapter():
                return row_logps(model, batch)
        return row_logps(reference, batch)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2 (Maechler 2012): near 0, log1p(-exp(x))
    loses every digit and its gradient is NaN at a mean log-probability that rounds to 0."""
    x = x.clamp(max=-1e-12)
    near = x > -0.6931471805599453
    # Each branch on inputs that are safe for it: torch.where still back-propagates through the branch not taken.
    return torch.where(
        near, torch.log(-torch.expm1(torch.where(near, x, -1.0))), torch.log1p(-torch.exp(torch.where(near, -1.0, x)))
    )


def pair_losses(policy: tuple, reference: tuple | None, lengths: tuple, loss: str, beta: float, gamma: float):
    """(per-pair losses, chosen rewards, rejected rewards) from the summed log-probabilities of the chosen and
    rejected answers under the policy and the reference (None for ORPO/SimPO) and their token counts."""
    (pc, pr), (lc, lr) = policy, lengths
    if loss in LENGTH_NORMALISED:
        pc, pr = pc / lc, pr / lr
    if loss in ("orpo", "simpo"):
        if loss == "orpo":  # Hong et al. 2024: NLL of the chosen + beta * -log sigmoid(log odds ratio)
            log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
            losses = -pc - beta * F.logsigmoid(log_odds)
        else:  # Meng et al. 2024: -log sigmoid(beta * (mean logp_w - mean logp_l) - gamma)
            losses = -F.logsigmoid(beta * (pc - pr) - gamma)
        return losses, beta * pc.detach(), beta * pr.detach()
    rc, rr = reference
    if loss in LENGTH_NORMALISED:
        rc, rr = rc / lc, rr / lr
    margin = (pc - rc) - (pr - rr)
    if loss == "sigmoid":  # Rafailov et al. 2023
        losses = -F.logsigmoid(beta * margin)
    elif loss == "hinge":  # SLiC (Zhao et al. 2023) as TRL and LLaMA-Factory write it
        losses = torch.relu(1 - beta * margin)
    else:  # ipo, Azar et al. 2023: (margin - 1 / (2 beta))^2, on mean log-probabilities as TRL computes it
        losses = (margin - 1 / (2 * beta)) ** 2
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


class Preference:
    """An `Objective` over pairs (see dist_glm.objectives). `reference`: None (ORPO/SimPO), "adapter" (the
    policy with its adapter off) or a frozen model (an engine under ZeRO-3)."""

    parts = PARTS
    per_token = False  # a loss per pair

    def __init__(self, cfg, reference, policy=None):
        check_head(policy, cfg.stage)
        # SimPO's target margin: -log sigmoid(beta * diff - gamma), LLaMA-Factory's beta * (diff - gamma / beta).
        self.loss, self.beta, self.gamma = cfg.pref_loss, cfg.pref_beta, cfg.simpo_gamma
        self.ftx, self.reference = cfg.pref_ftx, reference

    def collate(self, pairs, pad_id: int) -> dict[str, torch.Tensor]:
        batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
        batch["pairs"] = torch.tensor(len(pairs))
        return batch

    def count(self, batch: dict) -> int:
        """Pairs with a labelled answer (an evaluation padding slot has none)."""
        n = int(batch["pairs"])
        return int((batch["labels"][:n, 1:] != IGNORE_INDEX).any(-1).sum())

    def check_rows(self, rows) -> None:
        """Pairs were checked as they were built (dist_glm.data.preference)."""

    def prepare(self, model, batches: list[dict], device) -> None:
        """Each pair's loss needs nothing beyond its own rows."""

    def _sums(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = int(batch["pairs"])
        labelled = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1).float()
        real = labelled[:n] > 0  # an evaluation padding slot is a pair with nothing labelled: it adds nothing
        labelled = labelled.clamp(min=1)
        reference = reference_logps(self.reference, model, batch)
        logps = row_logps(model, batch)
        policy, lengths = (logps[:n], logps[n:]), (labelled[:n], labelled[n:])
        ref = None if reference is None else (reference[:n], reference[n:])
        losses, chosen, rejected = pair_losses(policy, ref, lengths, self.loss, self.beta, self.gamma)
        if self.ftx and self.loss != "orpo":  # ORPO's loss already holds the chosen answer's NLL
            losses = losses - self.ftx * logps[:n] / lengths[0]
        w = real.to(losses.dtype)
        parts = {
            "rewards/chosen": (w * chosen).sum(),
            "rewards/rejected": (w * rejected).sum(),
            "rewards/accuracies": (w * (chosen > rejected)).sum(),
            "rewards/margins": (w * (chosen - rejected)).sum(),
            "logps/chosen": (w * logps[:n].detach()).sum(),
            "logps/rejected": (w * logps[n:].detach()).sum(),
        }
        return (w * losses).sum(), parts

    def loss_sums(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self._sums(model, batch)

    def eval_sums(self, model, batch: dict) -> dict[str, torch.Tensor]:
        loss, parts = self._sums(model, batch)
        return {"loss": loss, **parts}


def load_reference(cfg, policy, ds_config: dict, device):
    """Collective under ZeRO-3. What the reference log-probabilities come from: nothing for ORPO/SimPO, the
    policy with its adapter off for adapter methods, else a frozen copy of the base model (partitioned and
    wrapped in an optimizer-less engine under ZeRO-3, as the distillation teacher)."""
    from pathlib import Path

    import deepspeed

    from dist_glm.models.artifacts import load_artifact, resolve_artifact
    from dist_glm.objectives.teacher import per_rank_gib, teacher_ds_config
    from dist_glm.runtime import collectives, deepspeed_config

    if not cfg.preference.needs_reference:
        collectives.log(f"preference: {cfg.preference.pref_loss} needs no reference model")
        return None
    if hasattr(policy, "disable_adapter"):  # a PEFT model (LoRA, QLoRA): its base is the reference
        collectives.log("preference: the reference is the base model with the adapter switched off (no second copy)")
        return "adapter"
    if cfg.model.train_from_scratch:
        raise UserError(
            f"train_from_scratch with stage={cfg.preference.stage}: the frozen reference would load "
            "model_name_or_path's weights, not "
            "the random start; preference training continues a trained model: set train_from_scratch=false"
        )
    zero3 = deepspeed_config.zero_stage(ds_config) == 3
    tds = teacher_ds_config(ds_config, cfg.train.dtype) if zero3 else None
    art = resolve_artifact(cfg.model.model_name_or_path, "")
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
        f"preference: reference model {Path(cfg.model.model_name_or_path)} (frozen, no optimizer state): weights per "
        f"rank {', '.join(f'{g:.3g}' for g in share)} GiB"
    )
    return module
