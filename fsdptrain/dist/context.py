"""Context parallelism's layout: which ranks form a context group and which chunk of a row each one takes.

With parallel.context_parallel N, the world is cut into groups of N consecutive ranks (rank r is in group r // N
and takes chunk r % N of every row). The ranks of a group read the same micro-batches, so the data sampler sees
world / N data-parallel ranks (`data_world`, `data_rank`); each rank then keeps its own contiguous 1/N of the
sequence (data/loader.py `context_chunk`) and attention exchanges sequence for heads inside the group
(model/ulysses.py). Weights stay sharded by FSDP over every rank of the world, context ranks included, so context
parallelism adds no weight memory, and FSDP's average over all ranks with the trainer's loss scale (world /
global units) is still the gradient of the global mean: the group's chunk losses sum to the row's loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from ..core.errors import ConfigError


@dataclass(frozen=True)
class ContextLayout:
    size: int  # N: ranks per context group (1: context parallelism off)
    world: int
    rank: int

    @property
    def data_world(self) -> int:
        """Data-parallel ranks: groups that read different micro-batches."""
        return self.world // self.size

    @property
    def data_rank(self) -> int:
        return self.rank // self.size

    @property
    def index(self) -> int:
        """The chunk of every row this rank keeps (0 = the first 1/N of the sequence)."""
        return self.rank % self.size

    @property
    def group_ranks(self) -> list[int]:
        start = self.data_rank * self.size
        return list(range(start, start + self.size))


def layout(size: int, world: int, rank: int) -> ContextLayout:
    """The layout of parallel.context_parallel `size`; refuses a size that does not divide the world."""
    if size < 1 or world % size:
        raise ConfigError(f"parallel.context_parallel: {size} does not divide the world size {world}; use a "
                          f"divisor of {world} (ranks of a context group are consecutive) or 1")
    return ContextLayout(size, world, rank)


def build_group(lay: ContextLayout) -> Optional[dist.ProcessGroup]:
    """This rank's context group (collective: every rank creates every group, in the same order); None for N=1."""
    if lay.size == 1:
        return None
    mine = None
    for g in range(lay.data_world):
        ranks = list(range(g * lay.size, (g + 1) * lay.size))
        group = dist.new_group(ranks)
        if lay.rank in ranks:
            mine = group
    return mine
