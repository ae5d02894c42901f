"""`fsdptrain mem diff A.pickle B.pickle`: live memory at each snapshot's peak, by allocation site, largest
difference first.

Typical use: the snapshots of the rank that peaks highest and of a normal rank
at the same step (memory.snapshot_steps): the sites at the top of the table
are what the heavy rank holds that the other does not.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.units import GIB, MIB, format_bytes
from . import snapshot


@dataclass
class SiteDiff:
    site: str
    a: int
    b: int

    @property
    def delta(self) -> int:
        return self.a - self.b


def diff(a: dict, b: dict) -> tuple[list[SiteDiff], int, int]:
    """Per-site bytes live at each snapshot's peak, sorted by |A - B| (largest first); and both peak totals."""
    blocks_a, peak_a = snapshot.live_at_peak(a)
    blocks_b, peak_b = snapshot.live_at_peak(b)
    sa, sb = snapshot.by_site(blocks_a), snapshot.by_site(blocks_b)
    rows = [SiteDiff(s, sa.get(s, 0), sb.get(s, 0)) for s in set(sa) | set(sb)]
    rows.sort(key=lambda r: (-abs(r.delta), r.site))
    return rows, peak_a, peak_b


def _mib(n: int) -> str:
    return f"{n / MIB:,.1f}"


def render(rows: list[SiteDiff], peak_a: int, peak_b: int, name_a: str, name_b: str, top: int = 20) -> str:
    lines = [f"A = {name_a}: peak allocated {format_bytes(peak_a)}",
             f"B = {name_b}: peak allocated {format_bytes(peak_b)}",
             f"A - B = {(peak_a - peak_b) / GIB:+.2f} GiB", "",
             f"{'A MiB':>10} {'B MiB':>10} {'A-B MiB':>10}  allocation site"]
    for r in rows[:top]:
        lines.append(f"{_mib(r.a):>10} {_mib(r.b):>10} {r.delta / MIB:>+10,.1f}  {r.site}")
    if len(rows) > top:
        rest = sum(r.delta for r in rows[top:])
        lines.append(f"{'':>10} {'':>10} {rest / MIB:>+10,.1f}  ({len(rows) - top} more sites)")
    return "\n".join(lines) + "\n"
