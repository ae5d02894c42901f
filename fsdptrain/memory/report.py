"""`fsdptrain mem report RUN_DIR`: per-rank table, imbalance summary, and a PNG of every rank's memory timeline.

Reads output_dir/memory/rank{R}.jsonl (written by tracker.py). The plot is
drawn with Pillow (installed with `datasets`), so no plotting library is needed.
With memory.breakdown_steps, output_dir/memory/breakdown_step{S}_rank{R}.json
(breakdown.py) add, per tracked step, every rank's peak by category side by
side and, when the ranks are imbalanced, the category that differs most, with
the tracked step's time against the untracked steps' (metrics.jsonl).
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UserError
from ..core.files import read_json, read_text
from ..core.units import GIB, format_bytes
from ..train.balance import COMPUTE_FILE, time_report


@dataclass
class RankSummary:
    rank: int
    records: int
    peak_allocated: int
    peak_reserved: int
    fragmentation: int  # largest inactive-split bytes seen (CUDA; 0 on CPU)
    retries: int
    ooms: int
    peak_step: int
    peak_phase: str
    peak_micro: object
    peak_tokens: int
    peak_longest: int
    host_peak: int = 0  # the process's peak resident host memory (CUDA records; 0 where not recorded)


def read_run(run_dir: str | Path) -> dict[int, list[dict]]:
    """rank -> its records in file order."""
    d = Path(run_dir) / "memory"
    if not d.is_dir():
        raise UserError(f"{run_dir}: no memory/ folder; train with memory.track_peak=true (the default) first")
    out: dict[int, list[dict]] = {}
    for f in sorted(d.glob("rank*.jsonl")):
        m = re.fullmatch(r"rank(\d+)\.jsonl", f.name)
        if not m:
            continue
        rows = []
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{f}:{n}: not a JSON line (a truncated write?); delete the line and retry") from None
        out[int(m.group(1))] = rows
    if not out:
        raise UserError(f"{d}: no rank*.jsonl files")
    return out


def summarize(rank: int, rows: list[dict]) -> RankSummary:
    if not rows:
        return RankSummary(rank, 0, 0, 0, 0, 0, 0, 0, "-", None, 0, 0)
    top = max(rows, key=lambda r: r["allocated_peak"])
    return RankSummary(
        rank=rank, records=len(rows), peak_allocated=top["allocated_peak"],
        peak_reserved=max(r["reserved_peak"] for r in rows),
        fragmentation=max(r.get("inactive_split_peak", 0) for r in rows),
        retries=max(r.get("num_alloc_retries", 0) for r in rows), ooms=max(r.get("num_ooms", 0) for r in rows),
        peak_step=top["step"], peak_phase=top["phase"], peak_micro=top.get("micro"),
        peak_tokens=top.get("batch_tokens", 0), peak_longest=top.get("longest", 0),
        host_peak=max(r.get("host_rss_peak", 0) for r in rows))


def imbalance(summaries: list[RankSummary]) -> tuple[float, int, float]:
    """(max / median peak allocated, rank of the max, median)."""
    peaks = [s.peak_allocated for s in summaries]
    med = statistics.median(peaks)
    r = max(range(len(peaks)), key=peaks.__getitem__)
    return (peaks[r] / med if med else 1.0), summaries[r].rank, med


def render_time(run_dir: str | Path) -> str:
    """The time line of a run of several ranks (memory/compute.json, written at its end): which rank the others
    waited for and what data.balance: speed would do; empty when the file is not there (one rank, compile, a
    run that did not finish)."""
    path = Path(run_dir) / "memory" / COMPUTE_FILE
    if not path.is_file():
        return ""
    data = read_json(path, "the ranks' compute times", "delete it (the next run writes it again)")
    try:
        ranks, balancing = [[float(x) for x in r] for r in data["ranks"]], bool(data["balancing"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: not the ranks' compute times (expected ranks and balancing); delete it") from None
    line = time_report(ranks, balancing)
    if line is None:
        return "\ntime: the ranks' compute per step was within 10% of each other\n"
    return "\n" + line + "\n"


def render(run_dir: str | Path, runs: dict[int, list[dict]]) -> str:
    sums = [summarize(r, rows) for r, rows in sorted(runs.items())]
    host = any(s.host_peak for s in sums)  # CUDA runs record the host's resident memory too
    lines = [f"memory per rank: {run_dir}",
             f"{'rank':>4} {'peak alloc GiB':>14} {'peak resv GiB':>13} {'frag GiB':>8} {'retries':>7} "
             f"{'step':>5}  {'phase at peak':<28} {'tokens':>8} {'longest':>7}" + (f" {'host peak GiB':>13}" if host
                                                                                 else "")]
    for s in sums:
        phase = s.peak_phase + (f" #{s.peak_micro}" if s.peak_micro is not None else "")
        lines.append(f"{s.rank:>4} {s.peak_allocated / GIB:>14.3f} {s.peak_reserved / GIB:>13.3f} "
                     f"{s.fragmentation / GIB:>8.3f} {s.retries:>7} {s.peak_step:>5}  {phase:<28} "
                     f"{s.peak_tokens:>8,} {s.peak_longest:>7,}" + (f" {s.host_peak / GIB:>13.3f}" if host else ""))
    ratio, r, med = imbalance(sums)
    top = next(s for s in sums if s.rank == r)
    lines.append("")
    lines.append(f"imbalance: max/median peak allocated = {ratio:.2f} (rank {r}: {top.peak_allocated / GIB:.3f} GiB, "
                 f"median {med / GIB:.3f} GiB)")
    med_tokens = statistics.median(s.peak_tokens for s in sums)
    if len(sums) > 1 and med_tokens and top.peak_tokens >= 1.2 * med_tokens:
        lines.append(f"likely cause: rank {r}'s batch at its peak had {top.peak_tokens / med_tokens:.1f}x the median's "
                     f"tokens ({top.peak_tokens:,} vs {int(med_tokens):,})")
    if any(s.ooms for s in sums):
        lines.append("out-of-memory errors on rank(s) " + ", ".join(str(s.rank) for s in sums if s.ooms)
                     + "; see memory/oom_rank*.txt")
    if runs and all(rows and rows[0].get("inactive_split", 0) == 0
                    and rows[0].get("reserved") == rows[0].get("allocated")
                    for rows in runs.values()):
        lines.append("note: CPU run: the numbers are process resident memory (RSS), not allocator bytes")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- breakdown (memory.breakdown_steps)

# where to look when a category differs between ranks
CAUSES = {
    "activations": "the ranks' micro-batches differ in tokens (data.micro_batch_sizes, long rows); balance them, "
                   "or checkpoint more blocks",
    "temporaries": "logits, loss and optimizer-update temporaries differ; train.loss_chunk_tokens bounds the logits",
    "parameters (gathered)": "gathered parameters differ (uneven shards, prefetch, reshard_after_forward)",
    "collective buffers": "all-gather / reduce-scatter buffers in flight differ (prefetch, collective timing)",
    "optimizer state": "uneven shards: the last ranks hold fewer rows of each parameter",
    "parameters (sharded)": "uneven shards: the last ranks hold fewer rows of each parameter",
    "gradients (sharded)": "uneven shards: the last ranks hold fewer rows of each parameter",
    "gradients (unsharded)": "unsharded gradients differ (accumulation without sync, reduce-scatter inputs)",
    "buffers + inputs": "the ranks' inputs differ in size",
}


def read_breakdowns(run_dir: str | Path) -> dict[int, dict[int, dict]]:
    """step -> rank -> its breakdown file (empty when the run tracked no step)."""
    out: dict[int, dict[int, dict]] = {}
    for f in sorted((Path(run_dir) / "memory").glob("breakdown_step*_rank*.json")):
        m = re.fullmatch(r"breakdown_step(\d+)_rank(\d+)\.json", f.name)
        if not m:
            continue
        data = read_json(f, "memory breakdown", "delete it, or train again with memory.breakdown_steps")
        if not isinstance(data, dict) or not {"peak", "categories", "seconds"} <= data.keys():
            raise UserError(f"{f}: not a memory breakdown file (no peak/categories); delete it, or train again "
                            "with memory.breakdown_steps")
        out.setdefault(int(m.group(1)), {})[int(m.group(2))] = data
    return out


def untracked_step_times(run_dir: str | Path, skip: set[int]) -> list[float]:
    """step_time_s of the logged steps in metrics.jsonl, without step 1 (warm-up) and the `skip` steps."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    times = []
    for n, line in enumerate(read_text(path, "metrics").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{n}: not a JSON line (a truncated write?); delete the line and retry") from None
        if "step_time_s" in rec and rec.get("step", 1) != 1 and rec.get("step") not in skip:
            times.append(float(rec["step_time_s"]))
    return times


def differing_category(ranks: dict[int, dict]) -> tuple[str, int, int]:
    """The category whose bytes at each rank's peak differ most between ranks: (category, rank of the most,
    rank of the least)."""
    cats = next(iter(ranks.values()))["categories"]

    def at(r: int, c: str) -> int:
        return ranks[r]["peak"]["by_category"].get(c, 0)

    spread = {c: max(at(r, c) for r in ranks) - min(at(r, c) for r in ranks) for c in cats}
    c = max(cats, key=lambda k: spread[k])
    return c, max(ranks, key=lambda r: at(r, c)), min(ranks, key=lambda r: at(r, c))


def render_breakdown(step: int, ranks: dict[int, dict], untracked: list[float]) -> str:
    order = sorted(ranks)
    cats = ranks[order[0]]["categories"]
    lines = ["", f"memory by category at step {step} (memory.breakdown_steps; each rank at its own peak):",
             f"  {'category':<24}" + "".join(f"{f'rank {r}':>12}" for r in order)]
    for c in cats:
        vals = [ranks[r]["peak"]["by_category"].get(c, 0) for r in order]
        if any(vals):
            lines.append(f"  {c:<24}" + "".join(f"{format_bytes(v):>12}" for v in vals))
    totals = {r: ranks[r]["peak"]["total"] for r in order}
    lines.append(f"  {'total (peak)':<24}" + "".join(f"{format_bytes(totals[r]):>12}" for r in order))
    lines.append(f"  {'phase at peak':<24}" + "".join(f"{ranks[r]['peak']['phase']:>12}" for r in order))
    lines.append("  micro-batches: " + "; ".join(
        f"rank {r} " + ", ".join(f"{a} x {b}" for a, b in ranks[r].get("micro_batches", [])) for r in order))
    if len(order) > 1:
        med = statistics.median(totals.values())
        top = max(order, key=totals.__getitem__)
        ratio = totals[top] / med if med else 1.0
        warn = ranks[top].get("imbalance_warn", 1.2)
        if ratio > warn:
            c, hi, lo = differing_category(ranks)
            a, b = (ranks[r]["peak"]["by_category"].get(c, 0) for r in (hi, lo))
            lines.append(f"imbalance: max/median peak = {ratio:.2f} (over memory.imbalance_warn {warn}), rank {top} "
                         f"highest; the category that differs most: {c} (rank {hi} {format_bytes(a)}, rank {lo} "
                         f"{format_bytes(b)}, difference {format_bytes(a - b)}): {CAUSES.get(c, '')}")
        else:
            lines.append(f"balanced: max/median peak = {ratio:.2f} (memory.imbalance_warn {warn})")
    tracked = ranks[order[0]]["seconds"]  # the lowest rank's, like metrics.jsonl's (rank 0 writes it)
    if untracked:
        base = statistics.median(untracked)
        lines.append(f"tracked step time: {tracked:.3f} s, {tracked / base:.1f}x the untracked steps' median "
                     f"{base:.3f} s (metrics.jsonl)")
    else:
        lines.append(f"tracked step time: {tracked:.3f} s (no untracked step logged in metrics.jsonl to compare)")
    return "\n".join(lines) + "\n"


def render_breakdowns(run_dir: str | Path) -> str:
    """Every tracked step's side-by-side table ('' when the run tracked none)."""
    steps = read_breakdowns(run_dir)
    untracked = untracked_step_times(run_dir, set(steps)) if steps else []
    return "".join(render_breakdown(s, ranks, untracked) for s, ranks in sorted(steps.items()))


# ----------------------------------------------------------------------------- the plot

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def plot(runs: dict[int, list[dict]], path: str | Path, width: int = 1200, height: int = 600) -> None:
    """Each rank's peak allocated memory per record (steps and phases in order) as one line; step boundaries dotted."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 80, width - 150, 40, height - 50
    n = max((len(r) for r in runs.values()), default=0)
    values = [r["allocated_peak"] / GIB for rows in runs.values() for r in rows]
    if n == 0 or not values:
        raise UserError(f"{path}: nothing to plot (no memory records)")
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.05
    lo, hi = max(0.0, lo - pad), hi + pad

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (right - left) * (i / max(1, n - 1))
        return x, bottom - (bottom - top) * (v - lo) / (hi - lo)

    d.rectangle([left, top, right, bottom], outline="black")
    for k in range(6):  # y ticks
        v = lo + (hi - lo) * k / 5
        _, y = xy(0, v)
        d.line([left - 4, y, left, y], fill="black")
        d.text((5, y - 6), f"{v:.2f}", fill="black", font=font)
    d.text((5, 10), "peak allocated GiB per phase (CPU runs: RSS)", fill="black", font=font)
    first = next(iter(runs.values()))
    last_step = None
    for i, rec in enumerate(first):  # step boundaries from the first rank's records
        if rec["step"] != last_step:
            x, _ = xy(i, lo)
            for y in range(top, bottom, 6):
                d.line([x, y, x, y + 2], fill=(190, 190, 190))
            if n < 400 or rec["step"] % 10 == 0:
                d.text((x + 2, bottom + 5), str(rec["step"]), fill="black", font=font)
            last_step = rec["step"]
    d.text(((left + right) // 2 - 40, bottom + 25), "optimizer step", fill="black", font=font)
    for j, (rank, rows) in enumerate(sorted(runs.items())):
        color = COLORS[j % len(COLORS)]
        pts = [xy(i, r["allocated_peak"] / GIB) for i, r in enumerate(rows)]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        else:
            d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=color)
        ly = top + 15 * j
        d.line([right + 10, ly + 6, right + 30, ly + 6], fill=color, width=3)
        d.text((right + 35, ly), f"rank {rank}", fill="black", font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(str(path), format="PNG")
