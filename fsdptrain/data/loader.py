"""Deterministic distributed batching: which examples each rank sees at each optimizer step.

A step's global batch is a fixed slice of the epoch's permutation (seeded by
seed and epoch), so it does not depend on the number of ranks: with G =
micro_batch_size x grad_accum_steps x world_size, step s of an epoch takes
positions [s*G, (s+1)*G); rank r takes its contiguous part of that and cuts it
into grad_accum_steps micro-batches. Every rank therefore runs the same number
of micro-steps (a rank with fewer would hang FSDP's collectives). The position
in the data is a pure function of the global step, which makes resuming exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UserError
from .tokenize import IGNORE, Example


@dataclass
class StepSampler:
    n_examples: int
    world_size: int
    rank: int
    micro_batch_size: int
    grad_accum_steps: int
    seed: int
    shuffle: bool = True
    drop_last: bool = True

    def __post_init__(self) -> None:
        if self.steps_per_epoch == 0:
            raise UserError(
                f"data: {self.n_examples} examples cannot fill one global batch of {self.global_batch} "
                f"(train.micro_batch_size {self.micro_batch_size} x train.grad_accum_steps {self.grad_accum_steps} "
                f"x {self.world_size} ranks); lower them, add data, or set data.drop_last=false"
            )

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        if self.drop_last:
            return self.n_examples // self.global_batch
        return math.ceil(self.n_examples / self.global_batch)

    def permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n_examples))
        g = torch.Generator().manual_seed(self.seed * 10_007 + epoch)
        return torch.randperm(self.n_examples, generator=g).tolist()

    def global_indices(self, step: int) -> list[int]:
        """The example indices of global step `step` (all ranks together)."""
        epoch, s = divmod(step, self.steps_per_epoch)
        perm = self.permutation(epoch)
        chunk = perm[s * self.global_batch:(s + 1) * self.global_batch]
        if len(chunk) < self.global_batch:  # drop_last=false: complete the batch from the epoch's start
            chunk = chunk + perm[: self.global_batch - len(chunk)]
        return chunk

    def rank_micro_batches(self, step: int) -> list[list[int]]:
        per_rank = self.micro_batch_size * self.grad_accum_steps
        mine = self.global_indices(step)[self.rank * per_rank:(self.rank + 1) * per_rank]
        m = self.micro_batch_size
        return [mine[i * m:(i + 1) * m] for i in range(self.grad_accum_steps)]


def collate(examples: list[Example], pad_id: int, multiple: int = 8) -> dict[str, torch.Tensor]:
    """Right-pad to a multiple of `multiple`; labels are shifted so labels[b, t] is the target of position t.

    Right padding under a causal mask never influences real tokens, so no
    attention mask is needed (the fast causal kernel path stays on).
    """
    longest = max(len(e.input_ids) for e in examples)
    width = math.ceil(longest / multiple) * multiple
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        labels[b, : n - 1] = torch.tensor(e.labels[1:n])
    n_tokens = sum(len(e.input_ids) for e in examples)
    return {"input_ids": ids, "labels": labels, "n_tokens": torch.tensor(n_tokens)}
