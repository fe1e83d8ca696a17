"""KTO (`stage: kto`; Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"):
answers labelled desirable or not, no pairs. With r = log pi(y|x) - log pi_ref(y|x), the answer's summed
log-probability ratio to the reference, and z0 the reference point (the policy's KL from the reference,
estimated on mismatched prompt / answer rows and clamped at 0, no gradient through it):

    desirable:   w_D * (1 - sigmoid(beta * (r - z0)))
    undesirable: w_U * (1 - sigmoid(beta * (z0 - r)))

LLaMA-Factory's keys: `pref_beta`, `kto_chosen_weight` (w_D), `kto_rejected_weight` (w_U), `pref_ftx`.

z0 is one number per optimizer step, estimated over the step's *global* batch: before the first backward,
`prepare` runs the KL rows of every micro-batch on every rank (no gradient, as TRL does) and all-reduces
their sum. TRL and LLaMA-Factory estimate it per micro-batch, so their step changes with the split; here
1 rank x 4, 2 ranks x 2 and accumulation give the same z0 and the same step. The KL rows are fixed with the
data (dist_glm.data.preference.load_feedback), not drawn per batch.

The loss is a sum over answers and `count` the answers: the loop divides by the global number of answers,
as TRL's mean over the batch does.
"""

import torch

from dist_glm.data.batching import collate
from dist_glm.data.preference import as_rows
from dist_glm.data.template import IGNORE_INDEX
from dist_glm.objectives.preference import check_head
from dist_glm.objectives.reference import CachedReference, attach, reference_logps, row_logps
from dist_glm.runtime import collectives

# Per answer of the global batch (the loop divides every part by the number of answers): the mean reward of
# the desirable answers is rewards/chosen_sum / count/chosen (TRL logs the same sums and counts).
PARTS = (
    "kl", "rewards/chosen_sum", "rewards/rejected_sum", "logps/chosen_sum", "logps/rejected_sum", "count/chosen",
    "count/rejected",
)  # fmt: skip


def kto_losses(policy, reference, desirable, z0: float, beta: float, w_desirable: float, w_undesirable: float):
    """(per-answer losses, rewards) from the answers' summed log-probabilities under the policy and the reference."""
    rewards = policy - reference
    losses = torch.where(
        desirable,
        w_desirable * (1 - torch.sigmoid(beta * (rewards - z0))),
        w_undesirable * (1 - torch.sigmoid(beta * (z0 - rewards))),
    )
    return losses, beta * rewards.detach()


def _labelled(labels: torch.Tensor) -> torch.Tensor:
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)


class KTO:
    """An `Objective` over labelled answers (see dist_glm.objectives). `reference`: "adapter" (the policy with
    its adapter off) or a frozen model (an engine under ZeRO-3), as for DPO."""

    parts = PARTS
    per_token = False  # a loss per answer

    def __init__(self, cfg, reference, policy=None):
        check_head(policy, cfg.stage)
        self.beta, self.ftx, self.reference = cfg.pref_beta, cfg.pref_ftx, reference
        self.weights = (cfg.kto_chosen_weight, cfg.kto_rejected_weight)
        self.z0 = 0.0  # set by `prepare` for the step (or the evaluation) at hand

    def collate(self, samples, pad_id: int) -> dict[str, torch.Tensor]:
        completions, kl_rows = [s.completion for s in samples], [s.kl for s in samples]
        batch = attach(self.reference, collate(completions, pad_id), completions)
        kl = attach(self.reference, collate(kl_rows, pad_id), kl_rows)
        # The KL rows run without gradient in `prepare`; token_mask (throughput) counts the answers' rows only.
        batch.update({f"kl_{k}": v for k, v in kl.items() if k != "token_mask"})
        batch["desirable"] = torch.tensor([s.desirable for s in samples])
        return batch

    def count(self, batch: dict) -> int:
        """Answers with a labelled token (an evaluation padding slot has none)."""
        return int((_labelled(batch["labels"]) > 0).sum())

    def check_rows(self, rows) -> None:
        """Rows were checked as they were read (dist_glm.data.preference); a reference cache must hold them."""
        if isinstance(self.reference, CachedReference):
            self.reference.check(as_rows(rows))

    def prepare(self, model, batches: list[dict], device) -> None:
        """Collective: z0 over the KL rows of every micro-batch of every rank, before any backward."""
        total, n = torch.zeros((), device=device, dtype=torch.float64), 0
        for batch in batches:
            kl = {k.removeprefix("kl_"): v.to(device) for k, v in batch.items() if k.startswith("kl_")}
            real = (_labelled(kl["labels"]) > 0).to(torch.float64)
            with torch.no_grad():
                policy = row_logps(model, kl)
            ratio = policy.double() - reference_logps(self.reference, model, kl).double()
            total += (real * ratio).sum()
            n += int(real.sum())
        # Every rank reaches this once per step (train_step) or per evaluation (eval_loss), with its own batches.
        total_sum, n_sum = collectives.all_reduce_sum([float(total), n]).tolist()
        self.z0 = max(total_sum / max(n_sum, 1.0), 0.0)

    def _sums(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        answers = {k: v for k, v in batch.items() if not k.startswith("kl_") and k != "desirable"}
        lengths = _labelled(batch["labels"]).float()
        w = (lengths > 0).float()  # an evaluation padding slot adds nothing
        desirable = batch["desirable"].bool()
        reference = reference_logps(self.reference, model, answers)
        logps = row_logps(model, answers)
        losses, rewards = kto_losses(logps, reference, desirable, self.z0, self.beta, *self.weights)
        if self.ftx:  # the desirable answers' mean NLL per token (LLaMA-Factory's SFT term)
            losses = losses - self.ftx * torch.where(desirable, logps / lengths.clamp(min=1), 0.0)
        d, u = w * desirable.float(), w * (~desirable).float()
        parts = {
            "kl": (w * self.z0).sum(),
            "rewards/chosen_sum": (d * rewards).sum(),
            "rewards/rejected_sum": (u * rewards).sum(),
            "logps/chosen_sum": (d * logps.detach()).sum(),
            "logps/rejected_sum": (u * logps.detach()).sum(),
            "count/chosen": d.sum(),
            "count/rejected": u.sum(),
        }
        return (w * losses).sum(), parts

    def loss_sums(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self._sums(model, batch)

    def eval_sums(self, model, batch: dict) -> dict[str, torch.Tensor]:
        loss, parts = self._sums(model, batch)
        return {"loss": loss, **parts}
