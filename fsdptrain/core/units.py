"""Byte units and the one human-readable size formatter (imports nothing of fsdptrain)."""

from __future__ import annotations

KIB = 2**10
MIB = 2**20
GIB = 2**30


def format_bytes(n: float) -> str:
    """A byte count in the largest binary unit that keeps it >= 1: '14.77 GiB', '742.50 MiB', '512 B'."""
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def rank_ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5' (ranks in increasing order)."""
    out: list[list[int]] = []
    for r in ranks:
        if out and out[-1][1] == r - 1:
            out[-1][1] = r
        else:
            out.append([r, r])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in out)
