"""The training loss: summed token cross-entropy, from full logits or chunked through lm_head.

Full logits cost tokens x vocab x 4 bytes in fp32, several times over during
cross-entropy (8.4 GB per copy at 16k tokens and a 128k vocabulary): often the
largest spike of a step. With `train.loss_chunk_tokens > 0` the lm_head is
swapped (class only: same weight, same state-dict key) for `ChunkedLossHead`,
which, while targets are set, returns the summed loss instead of logits,
computing lm_head + cross-entropy one chunk of tokens at a time under
checkpointing, so at most one chunk of logits exists at once, in forward and in
backward. It runs inside the model's forward, where FSDP has gathered the
lm_head weight, so sharding, mixed precision and gradient reduction work as usual.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .data.tokenize import IGNORE
from .errors import ConfigError


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")


class ChunkedLossHead(nn.Linear):
    """nn.Linear whose forward returns the summed loss while `targets` is set."""

    chunk_tokens: int = 4096
    targets: Optional[torch.Tensor] = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.targets is None:
            return super().forward(hidden)
        h = hidden.reshape(-1, hidden.size(-1))
        y = self.targets.reshape(-1)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, h.size(0), self.chunk_tokens):
            end = start + self.chunk_tokens
            total = total + checkpoint(_chunk_loss, h[start:end], self.weight, self.bias, y[start:end],
                                       use_reentrant=False)
        return total


def install_chunked_loss(model: nn.Module, chunk_tokens: int) -> Optional[ChunkedLossHead]:
    """Swap the output projection's class; None when chunking is off."""
    if chunk_tokens <= 0:
        return None
    head = model.get_output_embeddings()
    if type(head) not in (nn.Linear, ChunkedLossHead):
        raise ConfigError(f"train.loss_chunk_tokens: {type(model).__name__} has no plain nn.Linear lm_head; set it to 0")
    if getattr(model.config, "final_logit_softcapping", None):
        raise ConfigError(f"train.loss_chunk_tokens: {model.config.model_type} applies logit soft-capping after "
                          "lm_head, which the chunked loss would skip; set train.loss_chunk_tokens=0")
    head.__class__ = ChunkedLossHead
    head.chunk_tokens = chunk_tokens
    head.targets = None
    return head


@contextmanager
def targets_set(head: ChunkedLossHead, labels: torch.Tensor) -> Iterator[None]:
    head.targets = labels
    try:
        yield
    finally:
        head.targets = None


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor],
                   head: Optional[ChunkedLossHead] = None) -> torch.Tensor:
    """Sum of per-token cross-entropy over the batch's target tokens (fp32)."""
    # use_cache=False: a KV cache would grow again when checkpointed blocks recompute their forward
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "n_tokens")} | {"use_cache": False}
    if head is not None:
        with targets_set(head, batch["labels"]):
            return model(**inputs).logits  # the head returned the summed loss
    logits = model(**inputs).logits
    return F.cross_entropy(
        logits.float().view(-1, logits.size(-1)), batch["labels"].view(-1), ignore_index=IGNORE, reduction="sum"
    )
