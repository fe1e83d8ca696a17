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

from dist_glm.data.batching import collate
from dist_glm.data.preference import as_rows
from dist_glm.data.template import IGNORE_INDEX
from dist_glm.errors import UserError
from dist_glm.objectives.cross_entropy import has_native_head
from dist_glm.objectives.reference import CachedReference, attach, reference_logps, row_logps

# The losses on the mean log-probability per token (ORPO's and SimPO's papers define theirs on it; for IPO,
# whose paper uses sequence log-likelihoods, it is TRL's and LLaMA-Factory's choice, kept here so the numbers
# compare). Which losses need a reference model: PreferenceConfig.needs_reference.
LENGTH_NORMALISED = ("ipo", "orpo", "simpo")
PARTS = (
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
)  # fmt: skip


def check_head(policy, stage: str) -> None:
    if policy is not None and not has_native_head(policy):
        raise UserError(
            f"stage={stage}: this model's code (remote code) computes its LM head in its own layout, which the "
            "per-answer log-probabilities cannot use yet; ChatGLM2/3 and glm-4-9b-chat load without remote code "
            "(trust_remote_code: false), or train stage=sft"
        )


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
        rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        batch = attach(self.reference, collate(rows, pad_id), rows)
        batch["pairs"] = torch.tensor(len(pairs))
        return batch

    def count(self, batch: dict) -> int:
        """Pairs with a labelled answer (an evaluation padding slot has none)."""
        n = int(batch["pairs"])
        return int((batch["labels"][:n, 1:] != IGNORE_INDEX).any(-1).sum())

    def check_rows(self, rows) -> None:
        """Pairs were checked as they were built (dist_glm.data.preference); a reference cache must hold them."""
        if isinstance(self.reference, CachedReference):
            self.reference.check(as_rows(rows))

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
