"""Greedy bin packing of examples into fixed-length rows, each example still attending only to itself.

Examples are placed longest first into the fullest row that still has room
(best-fit decreasing), so rows come out nearly full. A packed row keeps the
lengths of its examples (`Example.seq_lens`); collate() turns them into
position_ids that restart at 0 for every example. Given restarting
position_ids and no attention mask, transformers builds the block-diagonal
causal mask itself for sdpa/eager, and flash attention runs varlen from the
position_ids (one row per batch: collate flattens for it). The first label of
every example in a row is masked: it would otherwise train the previous
example's last token to predict the next example's first.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from .encode import IGNORE, Example


def pack_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of the examples in each row; deterministic (ties broken by index)."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    bins: list[list[int]] = []
    # (room left, bin id), kept sorted: the first entry with room >= length is the best fit
    rooms: list[tuple[int, int]] = []
    for i in order:
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the packing length {capacity}")
        k = bisect.bisect_left(rooms, (n, -1))
        if k == len(rooms):
            bins.append([i])
            room, b = capacity - n, len(bins) - 1
        else:
            room, b = rooms.pop(k)
            bins[b].append(i)
            room -= n
        if room > 0:
            bisect.insort(rooms, (room, b))
    return bins


class PackedExamples:
    """A sequence of packed rows over a base sequence of examples."""

    def __init__(self, base, bins: list[list[int]]):
        self.base = base
        self.bins = bins

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> Example:
        ids: list[int] = []
        labels: list[int] = []
        lens: list[int] = []
        for j in self.bins[i]:
            ex = self.base[j]
            ids += ex.input_ids
            labels += [IGNORE] + list(ex.labels[1:])
            lens.append(len(ex.input_ids))
        return Example(ids, labels, seq_lens=lens)

    def unpacked(self, i: int) -> list[Example]:
        """The examples of row i (for tests and the reference loop)."""
        return [self.base[j] for j in self.bins[i]]


def pack(base, lengths: Sequence[int], capacity: int) -> PackedExamples:
    return PackedExamples(base, pack_bins(lengths, capacity))
