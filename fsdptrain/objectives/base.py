"""The objective seam: what a training step optimises, as one small value the trainer calls.

The trainer knows no loss function. For every optimizer step it
  1. asks the objective how many units each of its micro-batches counts (`units`: target tokens for SFT and
     pretraining) and sums them over micro-batches and ranks in its one all_reduce: the step's normaliser;
  2. per micro-batch calls `loss(model, batch, head, router_aux)`, which runs the forward and returns the
     micro-batch's *summed* loss (fp32, with its graph), the named metric sums, and (asked for on MoE models with
     an auxiliary loss) the router's auxiliary loss of that forward;
  3. backpropagates the sum x world_size / global units (FSDP averages gradients over ranks, so the update is the
     gradient of the mean over every unit of the step however units are split across ranks and micro-batches),
     and logs sum / global units as `loss` and each metric sum / global units under its name (or, for a metric
     the objective lists in `per`, its sum / another metric's sum: kto's rewards/chosen is a mean over the step's
     desirable examples; `metric_means`).
Evaluation uses the same two functions (no gradient): eval loss = summed loss / units over the eval set.

Context parallelism (parallel.context_parallel N: each rank of a group of N holds a chunk of every row). Token
objectives (sft) count their chunk's target tokens and sum their chunk's loss: the group's chunks add up to the
rows'. Objectives that score whole rows (`whole_rows`: dpo, kto, rm) sum their per-row values over the group
first (model/ulysses.py row_sum, an autograd all-reduce), so every rank of the group computes the same loss of
the same rows, and each counts those rows in full: units, loss sums and metric sums are then all N times the
unsplit run's, so every logged mean is unchanged (the trainer divides only the logged unit count by N), and the
gradient is too: the scale world / (N x units) times the N gradients the all-reduce's backward adds up on each
rank is world / units, and FSDP averages over all N x (world / N) ranks.

An objective is a plain frozen dataclass of functions, not a class to subclass; objectives/choose.py picks the
run's. Members: sft.py (token cross-entropy, SFT and pretraining), preference.py (dpo), reward.py (rm), kto.py
(kto).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .loss import ChunkedLossHead


@dataclass
class MicroLoss:
    """One micro-batch's result: `loss` summed over its units (fp32, differentiable); `metrics` named sums (no
    graph), each logged as its step sum / global units; `router_aux` the MoE router's auxiliary loss of this
    forward when the trainer asked for it, else None."""
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    router_aux: Optional[torch.Tensor] = None


LossFn = Callable[[nn.Module, dict, Optional[ChunkedLossHead], bool], MicroLoss]


@dataclass(frozen=True)
class Objective:
    name: str  # as in logs and docs, e.g. "sft"
    unit: str  # what the loss is averaged over, e.g. "target tokens"
    units: Callable[[dict], int]  # a micro-batch's count of units (host side: read from the collated batch)
    loss: LossFn  # (model, batch on the device, chunked loss head or None, router_aux wanted) -> MicroLoss
    metrics: tuple[str, ...] = ()  # the keys of MicroLoss.metrics, in the order they are gathered
    per: tuple[tuple[str, str], ...] = ()  # (metric, the metric whose step sum divides it instead of the units)
    token_nll: bool = False  # the loss is a mean token negative log-likelihood (SFT): eval reports exp(loss), ppl
    whole_rows: bool = False  # units are rows, counted in full by every rank of a context group (see above)


def metric_means(objective: Objective, sums: list[float], units: float) -> dict[str, float]:
    """The logged value of each metric from the step's (or eval set's) sums over all ranks: sum / units, or for a
    metric in `objective.per` sum / its divisor's sum, left out where that divisor is 0 (no such example)."""
    raw = dict(zip(objective.metrics, sums))
    per = dict(objective.per)
    out = {}
    for name, value in raw.items():
        if name not in per:
            out[name] = value / max(units, 1.0)
        elif raw[per[name]] > 0:
            out[name] = value / raw[per[name]]
    return out
