"""KTO (train.objective kto): single responses tagged desirable or not, against a reference model, as TRL's
KTOTrainer and LLaMA-Factory (stage kto) compute it.

A micro-batch holds n examples as rows [each example's own row..., each example's KL row...] and their tags
(`desirable`, data/loader.py): the KL row is the example's prompt with another example's response
(data/formats.py assign_kl_responses). Each row's log-probability is its response tokens' log-probabilities
summed. With the policy's and the reference's log-probabilities, the log-ratio x = policy - reference of each row
and beta = preference.beta:

  KL       = max(0, the mean of x over the KL rows of this micro-step on all ranks), no gradient
  desirable     w_c (1 - s(beta (x - KL)))
  undesirable   w_r (1 - s(beta (KL - x)))        (w_c, w_r: preference.kto_chosen_weight, kto_rejected_weight)

plus preference.ftx x the response's mean token negative log-likelihood for a desirable example. The unit is an
example: the step's loss is the mean over every example of the step on all ranks. The KL is all-reduced within
`loss` as a sum and a count over the ranks' KL rows (TRL takes the mean of each rank's mean: the same value
when ranks hold as many examples, as they do in training); so every rank's micro-step calls `loss` together,
which training and evaluation do (FSDP's forward needs every rank anyway).

Metrics (TRL's names): rewards/chosen and logps/chosen, means over the step's desirable examples (beta x the
log-ratio; the policy's log-probability); rewards/rejected and logps/rejected over its undesirable ones; kl, the
step's KL estimate (the mean over its micro-steps, weighted by examples); share/desirable and share/undesirable,
the shares of the step's examples with each tag. A step (all ranks together) without a desirable example logs no
rewards/chosen and logps/chosen, as TRL logs none; a rank without one adds nothing to them.

Context parallelism: the rows' log-probabilities are summed over the group (preference.py row_logps), so every
rank of a group holds the same whole-row ratios and counts the examples in full (`whole_rows`,
objectives/base.py); the KL's sum and count over all ranks are then both N times the unsplit run's, its mean
the same.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..config.schema import PreferenceConfig
from ..dist.distributed import all_reduce_sum
from .base import MicroLoss, Objective
from .loss import ChunkedLossHead
from .preference import Reference, response_rows, row_logps

METRICS = ("rewards/chosen", "rewards/rejected", "kl", "logps/chosen", "logps/rejected", "share/desirable",
           "share/undesirable")
PER = (("rewards/chosen", "share/desirable"), ("logps/chosen", "share/desirable"),
       ("rewards/rejected", "share/undesirable"), ("logps/rejected", "share/undesirable"))


def examples_in(batch: dict) -> int:
    """The KTO examples of a collated micro-batch that have a response (eval fillers have none)."""
    n = batch["labels"].shape[0] // 2
    return int(response_rows(batch)[:n].sum())


def kl_estimate(ratios: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """max(0, mean of the KL rows' log-ratios over every rank's valid rows), detached (TRL's kl)."""
    both = torch.stack([torch.where(valid, ratios.detach(), 0.0).sum(), valid.sum().to(ratios.dtype)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        all_reduce_sum(both)
    return (both[0] / both[1].clamp(min=1.0)).clamp(min=0.0)


def kto_losses(p: PreferenceConfig, ratios: torch.Tensor, desirable: torch.Tensor,
               kl: torch.Tensor) -> torch.Tensor:
    """Each example's weighted KTO loss from its log-ratio (policy - reference), its tag and the KL estimate."""
    chosen = 1 - torch.sigmoid(p.beta * (ratios - kl))
    rejected = 1 - torch.sigmoid(p.beta * (kl - ratios))
    return torch.where(desirable, p.kto_chosen_weight * chosen, p.kto_rejected_weight * rejected)


def kto_objective(p: PreferenceConfig, reference: Reference) -> Objective:
    """The kto objective of `p` against `reference` (train/build.py build_reference)."""

    def loss(model: nn.Module, batch: dict, head: Optional[ChunkedLossHead], router_aux: bool) -> MicroLoss:
        desirable = batch["desirable"]
        rows = {k: v for k, v in batch.items() if k != "desirable"}
        n = desirable.shape[0]
        with torch.no_grad(), reference(model) as ref_model:  # first, as dpo's (preference.py)
            ref_logps, _ = row_logps(ref_model, rows)
        aux: Optional[list] = [] if router_aux else None
        logps, counts = row_logps(model, rows, aux)
        valid = counts[:n] > 0
        ratios = logps - ref_logps
        kl = kl_estimate(ratios[n:], valid & (counts[n:] > 0))
        own = ratios[:n]
        losses = kto_losses(p, own, desirable, kl)
        if p.ftx > 0:  # a desirable response's mean token NLL (LLaMA-Factory's sft term)
            nll = -logps[:n] / counts[:n].clamp(min=1)
            losses = losses + torch.where(desirable, p.ftx * nll, 0.0)
        w = valid.to(losses.dtype)
        chosen, rejected = w * desirable, w * ~desirable
        reward, policy = p.beta * own.detach(), logps[:n].detach()
        metrics = {"rewards/chosen": (reward * chosen).sum(), "rewards/rejected": (reward * rejected).sum(),
                   "kl": kl * w.sum(), "logps/chosen": (policy * chosen).sum(),
                   "logps/rejected": (policy * rejected).sum(), "share/desirable": chosen.sum(),
                   "share/undesirable": rejected.sum()}
        return MicroLoss(torch.where(valid, losses, 0.0).sum(), metrics, aux[0] if aux else None)

    return Objective("kto", "examples", examples_in, loss, METRICS, PER, whole_rows=True)
