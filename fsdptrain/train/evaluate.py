"""Held-out loss of a sharded model: exact on any number of ranks, and without side effects on training.

eval loss = (the objective's summed loss over the eval examples evaluated) /
(their units: for SFT, per-token cross-entropy over every target token / the
number of those tokens), summed in float64 over micro-batches and ranks;
perplexity = exp(loss) where the loss is a token NLL (SFT; a pair objective's
loss per pair has no perplexity: none is reported). data/evalset.py deals the
examples so that each is counted exactly once on any world size.

The model runs under `torch.no_grad` in eval mode (dropout off) and goes back
to its former mode; the random state is forked, and nothing touches the
optimizer, scheduler or sampler, so training after an evaluation is bitwise the
training without it. With the chunked loss head the no-grad path computes the
loss chunk by chunk and builds no gradients.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..config.schema import Config
from ..data.evalset import eval_count, rank_eval_batches
from ..data.loader import collate, to_device
from ..dist import distributed
from ..objectives.base import Objective, metric_means
from ..objectives.loss import ChunkedLossHead


@dataclass
class EvalResult:
    loss: float  # mean loss per unit (SFT: cross-entropy per target token)
    tokens: int  # units evaluated, all ranks (SFT: target tokens)
    examples: int  # eval rows evaluated (packed rows when packing)
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)  # the objective's metrics (dpo: rewards/...) per unit
    token_nll: bool = True  # the loss is a mean token NLL (the objective's token_nll): it has a perplexity
    unit: str = "tokens"  # what `tokens` counts, for the eval line (the objective's unit: tokens, pairs)

    @property
    def ppl(self) -> Optional[float]:
        """exp(loss) for a token NLL; None for a loss that is not one (dpo, rm: a loss per pair)."""
        if not self.token_nll:
            return None
        return math.exp(self.loss) if self.loss < 700 else float("inf")

    def metrics(self) -> dict:
        ppl = {"eval_ppl": self.ppl} if self.token_nll else {}
        return {"eval_loss": self.loss, **ppl, "eval_tokens": self.tokens, "eval_time_s": round(self.seconds, 3),
                **{f"eval_{k}": v for k, v in self.extra.items()}}

    @property
    def units(self) -> str:
        """What `tokens` counts, in a word: tokens (SFT's target tokens), pairs (dpo, rm)."""
        return self.unit.split()[-1]

    def summary(self) -> str:
        """The eval line's values: 'loss L ppl P' for a token NLL, 'loss L rewards/accuracies A' for pairs (their
        loss has no perplexity), then the units counted."""
        shown = {"ppl": self.ppl} if self.token_nll else {k: v for k, v in self.extra.items()
                                                          if k == "rewards/accuracies"}
        return " ".join([f"loss {self.loss:.6f}", *(f"{k} {v:.4f}" for k, v in shown.items()),
                         f"{self.units} {self.tokens}"])


def eval_micro_batch(cfg: Config) -> int:
    return cfg.train.eval_micro_batch_size or cfg.train.micro_batch_size


def evaluate(model: nn.Module, objective: Objective, examples: Any, pad_id: int, device: torch.device,
             world_size: int, rank: int, micro_batch: int, max_batches: int = 0,
             head: Optional[ChunkedLossHead] = None, flatten: bool = False,
             on_batch: Optional[Callable[[int], None]] = None) -> EvalResult:
    """The eval loss of `model` on `examples` (collective: every rank calls it with the same arguments but
    its rank). on_batch(i) runs after this rank's i-th forward (memory records)."""
    t0 = time.perf_counter()
    n = eval_count(len(examples), micro_batch, max_batches)
    # loss sum, target tokens (the objective's units), the objective's metric sums
    sums = torch.zeros(2 + len(objective.metrics), dtype=torch.float64, device=device)
    was_training = model.training
    forked = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked, device_type="cuda"), torch.no_grad():
        model.eval()
        try:
            for i, rows in enumerate(rank_eval_batches(examples, n, world_size, rank, micro_batch, pad_id)):
                b = collate(rows, pad_id, flatten=flatten)
                batch = to_device(b, device, pin=device.type == "cuda")  # training batches come pinned
                out = objective.loss(model, batch, head, False)
                sums[0] += out.loss.double()
                sums[1] += objective.units(b)
                for k, name in enumerate(objective.metrics):
                    sums[2 + k] += out.metrics[name].double()
                if on_batch is not None:
                    on_batch(i)
        finally:
            model.train(was_training)
    if torch.distributed.is_initialized():
        distributed.all_reduce_sum(sums)
    loss_sum, tokens, *metric_sums = sums.tolist()
    extra = metric_means(objective, metric_sums, tokens)
    return EvalResult(loss_sum / max(tokens, 1.0), int(tokens), n, time.perf_counter() - t0, extra,
                      objective.token_nll, objective.unit)
