"""Supervised fine-tuning and pretraining: the mean cross-entropy over every target token of the step.

A target token is a label that is not IGNORE (assistant turns in chat data; every token after the first in
pretraining rows). The summed cross-entropy comes from objectives/loss.py, from full logits or chunked through
the lm_head.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..data.encode import IGNORE
from .base import MicroLoss, Objective
from .loss import ChunkedLossHead, token_loss_sum


def target_tokens(batch: dict) -> int:
    return int((batch["labels"] != IGNORE).sum())


def token_cross_entropy(model: nn.Module, batch: dict, head: Optional[ChunkedLossHead], router_aux: bool
                        ) -> MicroLoss:
    aux: Optional[list] = [] if router_aux else None
    total = token_loss_sum(model, batch, head, aux)
    return MicroLoss(total, router_aux=aux[0] if aux else None)


SFT = Objective("sft", "target tokens", target_tokens, token_cross_entropy, token_nll=True)
