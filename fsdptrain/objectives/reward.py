"""Reward-model training (train.objective rm): a scalar score per sequence, pairwise loss on preference pairs.

The model is the family's *ForSequenceClassification with one label (model/models.py as_reward_config): the base
model and `score`, a Linear(hidden, 1, bias=False), whose value at the last non-pad token is the sequence's
reward (transformers' own forward picks the token, so an exported folder scores as training did). A micro-batch
holds whole pairs as rows [chosen..., rejected...] (data/loader.py), as for dpo; with the chosen and rejected
rewards c, r of a pair its loss is

  -log s(c - r)        (s: the logistic function; LLaMA-Factory's and TRL's pairwise reward loss)

The unit is a pair: the step's loss is the mean over every pair of the step on all ranks. Metrics (TRL's names,
each a mean over the step's pairs): rewards/chosen, rewards/rejected (the scores), rewards/accuracies (chosen
scored above rejected), rewards/margins (c - r). The labels only tell which rows are filler (evaluation pads a
rank's last round with pairs that have no response): those pairs count as none.

Context parallelism (each rank of a group holds a chunk of every row): the score comes from the rank holding
the row's last token and is summed over the group, so every rank computes the same pair losses; each counts the
pairs in full (`whole_rows`), which keeps the loss, metrics and gradient those of the unsplit run
(objectives/base.py).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data.encode import IGNORE
from ..model import ulysses
from .base import MicroLoss, Objective
from .loss import ChunkedLossHead
from .preference import pairs_in

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def row_scores(model: nn.Module, batch: dict) -> torch.Tensor:
    """Each row's reward (fp32): the score head at the row's last non-pad token. Under context parallelism the
    model scores its chunk's last non-pad token; the rank whose chunk holds the row's last one gives the score
    (model/ulysses.py holds_last_token), summed over the group so that every rank has it."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "n_tokens")} | {"use_cache": False}
    scores = model(**inputs).logits.float().squeeze(-1)
    if not ulysses.splitting():
        return scores
    holds = ulysses.holds_last_token(batch["input_ids"], model.config.get_text_config().pad_token_id)
    return ulysses.row_sum(torch.where(holds, scores, 0.0))


def reward_loss(model: nn.Module, batch: dict, head: Optional[ChunkedLossHead], router_aux: bool) -> MicroLoss:
    """The micro-batch's summed pairwise loss; a sequence-classification model returns no router loss (an MoE's
    coefficient set explicitly is refused by the config)."""
    scores = row_scores(model, batch)
    n = scores.shape[0] // 2
    c, r = scores[:n], scores[n:]
    # the whole rows' targets under context parallelism (the chunk may hold none of a row's response)
    valid = ulysses.row_sum((batch["labels"] != IGNORE).sum(1))[:n] > 0
    w = valid.to(scores.dtype)
    losses = torch.where(valid, -F.logsigmoid(c - r), 0.0)
    cd, rd = c.detach(), r.detach()
    values = (cd, rd, (cd > rd).to(w.dtype), cd - rd)
    return MicroLoss(losses.sum(), {name: (v * w).sum() for name, v in zip(METRICS, values)})


REWARD = Objective("rm", "pairs", pairs_in, reward_loss, METRICS, whole_rows=True)
