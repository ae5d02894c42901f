"""`fsdptrain plot RUN_DIR [RUN_DIR ...]`: the curves of one or more runs in one PNG.

Six panels over optimizer steps: train loss (raw, faint, and smoothed), eval
loss, learning rate, tokens/s per device, and every rank's peak memory (from
memory/rank*.jsonl), runs overlaid in one colour each. matplotlib is an optional
extra (`pip install 'fsdptrain[plot]'`), imported only here. The PNG is written
to a temporary name and renamed; an existing file is replaced only when this
command wrote it (its PNG metadata says so).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from ..core.errors import UserError
from ..core.files import reading
from ..core.units import GIB
from ..memory.report import read_run

SOFTWARE = "fsdptrain plot"


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl; give a run directory (output_dir of a run)")
    rows = []
    with reading(path, "a run's metrics"):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
    return rows


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def memory_by_step(run_dir: Path) -> dict[int, tuple[list[int], list[float]]]:
    """rank -> (steps, peak allocated GiB of each step), from memory/rank*.jsonl; {} without memory records."""
    if not (run_dir / "memory").is_dir():
        return {}
    out = {}
    for rank, rows in read_run(run_dir).items():
        peaks: dict[int, float] = {}
        for r in rows:
            step = int(r.get("step", 0))
            peaks[step] = max(peaks.get(step, 0.0), float(r.get("allocated_peak", 0)) / GIB)
        steps = sorted(s for s in peaks if s > 0)
        out[rank] = (steps, [peaks[s] for s in steps])
    return out


def written_by_us(path: Path) -> bool:
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.info.get("Software") == SOFTWARE
    except Exception:  # noqa: BLE001  (not an image, unreadable: not ours)
        return False


def plot(run_dirs: list[str], out: Optional[str] = None) -> Path:
    """Draw the runs into `out` (default: the first run's plot.png); returns the file written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plot: matplotlib is not installed; pip install 'fsdptrain[plot]' (or pip install "
                        "matplotlib)") from None
    dirs = [Path(d) for d in run_dirs]
    target = Path(out) if out else dirs[0] / "plot.png"
    if target.exists() and not written_by_us(target):
        raise UserError(f"--out: {target} exists and was not written by fsdptrain plot; give another file")
    runs = [(d, read_metrics(d)) for d in dirs]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9), dpi=100)
    (ax_loss, ax_eval, ax_lr), (ax_tok, ax_mem, ax_note) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (d, rows) in enumerate(runs):
        c, name = colors[k % len(colors)], d.resolve().name
        train = [r for r in rows if "loss" in r]
        evals = [r for r in rows if "eval_loss" in r]
        steps = [r["step"] for r in train]
        if train:
            ax_loss.plot(steps, [r["loss"] for r in train], color=c, alpha=0.25, linewidth=1)
            ax_loss.plot(steps, smooth([r["loss"] for r in train]), color=c, linewidth=2, label=f"{name} (smoothed)")
            ax_lr.plot(steps, [r["lr"] for r in train], color=c, label=name)
            ax_tok.plot(steps, [r.get("tokens_per_s_per_device", 0) for r in train], color=c, label=name)
        if evals:
            ax_eval.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color=c, label=name)
            if train:
                ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o--", color=c,
                             linewidth=1, markersize=4, label=f"{name} eval")
        styles = ["-", "--", ":", "-."]
        for rank, (msteps, peaks) in memory_by_step(d).items():
            ax_mem.plot(msteps, peaks, styles[rank % len(styles)], color=c, label=f"{name} rank {rank}")
    titles = [(ax_loss, "train loss (faint: raw)", "loss"), (ax_eval, "eval loss", "loss"),
              (ax_lr, "learning rate", "lr"), (ax_tok, "tokens/s per device", "tokens/s"),
              (ax_mem, "peak allocated memory per rank (CPU: RSS)", "GiB")]
    for ax, title, ylabel in titles:
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax_note.axis("off")
    ax_note.text(0.0, 1.0, "\n".join(f"{d.resolve().name}: {d}" for d in dirs), va="top", fontsize=9, wrap=True)
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp.png")
    fig.savefig(tmp, metadata={"Software": SOFTWARE})
    plt.close(fig)
    os.replace(tmp, target)
    return target
