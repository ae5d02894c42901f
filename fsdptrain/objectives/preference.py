"""Preference training (train.objective dpo): DPO's sigmoid loss, IPO, hinge, ORPO and SimPO on pairs.

A micro-batch holds whole pairs as rows [chosen of each pair..., rejected of each pair...] (data/loader.py), so
one forward scores both responses. Each row's log-probability is its response tokens' log-probabilities summed
(the prompt's labels are IGNORE), as LLaMA-Factory computes it; ipo, orpo and simpo use the per-token mean
instead (sum / response tokens), as its pref_loss does. With the policy's log-probabilities c, r (chosen,
rejected) and the reference model's rc, rr, per pair:

  sigmoid  -(1 - eps) log s(beta d) - eps log s(-beta d),  d = (c - rc) - (r - rr)   (eps: label_smoothing)
  hinge    max(0, 1 - beta d)
  ipo      (d - 1 / (2 beta))^2                                 (per-token means)
  orpo     -c + beta * -log s(log odds(c) - log odds(r)),  log odds(x) = x - log(1 - e^x)   (no reference)
  simpo    -log s(beta (c - r) - gamma)                                               (no reference)

plus ftx x (the chosen response's mean token negative log-likelihood) with preference.ftx > 0. The unit is a
pair: the step's loss is the mean over every pair of the step on all ranks, however they are split. Metrics
(TRL's names, each a mean over the step's pairs): rewards/chosen and rewards/rejected (beta x the log-ratio to
the reference; beta x the log-probability without one), rewards/accuracies (chosen reward above rejected),
rewards/margins, logps/chosen and logps/rejected (the policy's, summed or per-token as the loss uses them).

The reference's log-probabilities are computed under no_grad inside `loss`, before the policy's forward of the
same micro-batch, rather than precomputed in a pass before training: that pass would cost a data-order-aware
store of two numbers per pair and a resume story, for a forward that costs a third of a training step; here a
LoRA run's reference is its own policy with the adapters off, and nothing is kept between steps.

Context parallelism: each rank of a group holds a chunk of every row; `row_logps` sums the chunks' log-
probabilities and target counts over the group (the policy's and the reference's alike), so every rank computes
the same pair losses, and each counts the pairs in full (`whole_rows`, objectives/base.py).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config.schema import PreferenceConfig
from ..data.encode import IGNORE
from ..model import ulysses
from .base import MicroLoss, Objective
from .loss import ChunkedLossHead

Reference = Callable[[nn.Module], AbstractContextManager]  # policy -> context yielding the reference model
PER_TOKEN = ("ipo", "orpo", "simpo")  # losses on the per-token mean log-probability
REFERENCE_FREE = ("orpo", "simpo")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
SIMPO_GAMMA = 0.5  # preference.simpo_gamma null


def needs_reference(p: PreferenceConfig) -> bool:
    return p.loss not in REFERENCE_FREE


def response_rows(batch: dict) -> torch.Tensor:
    """Which rows of a collated micro-batch have a response (eval filler pairs have none); of the whole rows
    under context parallelism (the chunk's `row_targets`, data/loader.py context_chunk)."""
    if "row_targets" in batch:
        return batch["row_targets"] > 0
    return (batch["labels"] != IGNORE).any(dim=1)


def pairs_in(batch: dict) -> int:
    """The pairs of a collated micro-batch that have a response (eval filler pairs have none)."""
    return int(response_rows(batch)[: batch["labels"].shape[0] // 2].sum())


def row_logps(model: nn.Module, batch: dict, router_aux: Optional[list] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's target tokens (fp32), the row's target count)."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "n_tokens")} | {"use_cache": False}
    if router_aux is not None:
        inputs["output_router_logits"] = True
    out = model(**inputs)
    labels = batch["labels"]
    mask = labels != IGNORE
    per_token = torch.gather(out.logits.float().log_softmax(-1), 2, labels.masked_fill(~mask, 0).unsqueeze(2))
    if router_aux is not None:
        router_aux.append(out.aux_loss.float())
    # context parallelism: the chunk's sums -> the whole rows', on every rank of the group (model/ulysses.py)
    return ulysses.row_sum((per_token.squeeze(2) * mask).sum(-1)), ulysses.row_sum(mask.sum(-1))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, without cancellation near 0 (LLaMA-Factory writes log1p(-exp(x)))."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def pair_losses(p: PreferenceConfig, c: torch.Tensor, r: torch.Tensor, rc: Optional[torch.Tensor],
                rr: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen reward, rejected reward) from the policy's and the reference's log-probabilities."""
    beta = p.beta
    if p.loss in REFERENCE_FREE:
        if p.loss == "orpo":
            log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
            losses = -c - beta * F.logsigmoid(log_odds)
        else:
            gamma = SIMPO_GAMMA if p.simpo_gamma is None else p.simpo_gamma
            losses = -F.logsigmoid(beta * (c - r) - gamma)
        return losses, beta * c.detach(), beta * r.detach()
    d = (c - rc) - (r - rr)
    if p.loss == "sigmoid":
        eps = p.label_smoothing
        losses = -F.logsigmoid(beta * d) * (1 - eps) - F.logsigmoid(-beta * d) * eps
    elif p.loss == "hinge":
        losses = torch.relu(1 - beta * d)
    else:  # ipo
        losses = (d - 1 / (2 * beta)) ** 2
    return losses, beta * (c - rc).detach(), beta * (r - rr).detach()


def preference_objective(p: PreferenceConfig, reference: Optional[Reference]) -> Objective:
    """The dpo objective of `p`; `reference` (train/build.py build_reference) is needed unless the loss is
    reference-free."""
    if needs_reference(p) and reference is None:
        raise ValueError(f"preference loss {p.loss} needs a reference model")
    per_token = p.loss in PER_TOKEN

    def scored(logps: torch.Tensor, counts: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if per_token:
            logps = logps / counts.clamp(min=1)
        valid = counts[:n] > 0
        # a filler pair (evaluation) has no response: a harmless stand-in keeps its (masked) loss finite
        return torch.where(torch.cat([valid, valid]), logps, torch.full_like(logps, -1.0)), valid

    def loss(model: nn.Module, batch: dict, head: Optional[ChunkedLossHead], router_aux: bool) -> MicroLoss:
        n = batch["labels"].shape[0] // 2
        ref: tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None)
        if needs_reference(p):  # first, so FSDP's records of the policy's forward stay its own (build.py)
            with torch.no_grad(), reference(model) as ref_model:
                ref_logps, ref_counts = row_logps(ref_model, batch)
            ref_logps, _ = scored(ref_logps, ref_counts, n)
            ref = (ref_logps[:n], ref_logps[n:])
        aux: Optional[list] = [] if router_aux else None
        logps, counts = row_logps(model, batch, aux)
        logps, valid = scored(logps, counts, n)
        c, r = logps[:n], logps[n:]
        losses, chosen_rewards, rejected_rewards = pair_losses(p, c, r, *ref)
        if p.ftx > 0:  # the chosen response's mean token NLL (LLaMA-Factory's sft term)
            losses = losses - p.ftx * (c if per_token else c / counts[:n].clamp(min=1))
        w = valid.to(losses.dtype)
        values = (chosen_rewards, rejected_rewards, (chosen_rewards > rejected_rewards).to(w.dtype),
                  chosen_rewards - rejected_rewards, c.detach(), r.detach())
        metrics = {name: (v * w).sum() for name, v in zip(METRICS, values)}
        return MicroLoss(torch.where(valid, losses, 0.0).sum(), metrics, aux[0] if aux else None)

    return Objective("dpo", "pairs", pairs_in, loss, METRICS, whole_rows=True)
