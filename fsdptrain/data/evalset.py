"""Held-out evaluation data: the seeded validation split, and how eval examples are dealt to ranks.

`split` cuts data.val_size examples out of the tokenised set before packing: a
seeded permutation (seed only, never the world size) picks them, so the split is
the same on any number of ranks and the two parts are disjoint.

`rank_eval_batches` deals the eval examples (in their fixed order) to ranks in
rounds of world_size x micro-batch: every rank runs the same number of forwards,
and the slots past the last example hold a one-token row whose label is masked,
so each example is counted exactly once whatever the world size (no drop_last); for preference data the
filler is a pair of such rows, which the objective counts as no pair.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Optional

import torch

from ..core.errors import ConfigError
from .encode import IGNORE, Example, Feedback, Pair, example_length

SPLIT_SALT = 7_727  # the split's generator differs from the sampler's (seed * 10_007 + epoch)


class Subset:
    """A view of some examples of a base sequence (TokenizedExamples, a list, ...), by index."""

    def __init__(self, base, indices: Sequence[int], base_lengths: Optional[Sequence[int]] = None):
        self.base, self.indices = base, list(indices)
        if base_lengths is None:
            base_lengths = [example_length(base[i]) for i in range(len(base))]
        self.lengths = [int(base_lengths[i]) for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Example:
        return self.base[self.indices[i]]


def val_count(val_size: float, n: int) -> int:
    """Examples data.val_size takes out of n: a fraction in (0, 1) (rounded up) or a whole number."""
    if val_size <= 0:
        return 0
    if val_size < 1:
        k = math.ceil(val_size * n)
    elif float(val_size).is_integer():
        k = int(val_size)
    else:
        raise ConfigError(f"data.val_size: {val_size:g} is neither a fraction in (0, 1) nor a whole number of "
                          "examples; write e.g. 0.05 or 200")
    if k >= n:
        raise ConfigError(f"data.val_size: {val_size:g} takes {k} of the {n} examples, leaving none to train on; "
                          "lower data.val_size or add data")
    return k


def split(examples, lengths: Sequence[int], val_size: float, seed: int) -> tuple[Subset, Subset]:
    """(train, eval) views: a seeded choice of val_count examples for eval, both in their original order."""
    n = len(examples)
    k = val_count(val_size, n)
    g = torch.Generator().manual_seed(seed * 10_007 + SPLIT_SALT)
    chosen = set(torch.randperm(n, generator=g)[:k].tolist())
    train = [i for i in range(n) if i not in chosen]
    return Subset(examples, train, lengths), Subset(examples, sorted(chosen), lengths)


def _digest(e: Example | Pair | Feedback) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    if isinstance(e, Feedback):  # the KL row is another record's response: the example and its tag say which
        h.update(repr((list(e.example.input_ids), list(e.example.labels), e.desirable)).encode())
    elif isinstance(e, Pair):
        h.update(repr([(list(r.input_ids), list(r.labels)) for r in (e.chosen, e.rejected)]).encode())
    else:
        h.update(repr((list(e.input_ids), list(e.labels))).encode())
    return h.digest()


def overlap_count(train, evals) -> int:
    """Eval examples whose tokens and labels are also a training example (the same record in both)."""
    seen = {_digest(train[i]) for i in range(len(train))}
    return sum(1 for i in range(len(evals)) if _digest(evals[i]) in seen)


def eval_count(n_examples: int, micro_batch: int, max_batches: int) -> int:
    """Eval examples evaluated: all, or the first max_batches x micro_batch (0: no cap), whatever the world size."""
    return n_examples if max_batches <= 0 else min(n_examples, max_batches * micro_batch)


def rank_eval_batches(examples, n: int, world_size: int, rank: int, micro_batch: int,
                      pad_id: int) -> Iterator[list[Example]]:
    """This rank's eval micro-batches over the first n examples: round k, rank r takes positions
    [(k * world_size + r) * micro_batch, ... + micro_batch); empty slots get a fully masked one-token row."""
    filler: Example | Pair | Feedback = Example([pad_id], [IGNORE])
    if n and isinstance(examples[0], Pair):
        filler = Pair(filler, filler)
    if n and isinstance(examples[0], Feedback):
        filler = Feedback(filler, filler, False)
    per_round = world_size * micro_batch
    for k in range(math.ceil(n / per_round)):
        start = k * per_round + rank * micro_batch
        yield [examples[i] if i < n else filler for i in range(start, start + micro_batch)]
