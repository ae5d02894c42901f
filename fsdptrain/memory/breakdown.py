"""memory.breakdown_steps: one step of a real run measured by category and phase, on every rank.

At each step listed in memory.breakdown_steps the trainer runs its train_step
inside `track_step`: a phases.PhaseTracker (torch's FSDPMemTracker on the run's
real tensors, any device) closes a phase at each of the trainer's own phase
records (MemoryTracker.phase: forward #i, backward #i, optimizer), and the
result goes to output_dir/memory/breakdown_step{S}_rank{R}.json, written under
a temporary name and renamed: each phase's peak by category, the step's peak,
each category's largest value, the optimizer state, the micro-batch shapes and
the step's time. `fsdptrain mem report` sets the ranks side by side
(memory/report.py). The tracker only watches allocations; the step computes
the same numbers (tested: bitwise equal losses).

On CUDA only the run's GPU is counted (host-side tensors such as offloaded
optimizer state are not); on the CPU every tensor is, as in `estimate --trace`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config.schema import Config, MemoryConfig
from ..core.errors import ConfigError
from ..core.files import write_atomic
from ..dist.distributed import DistInfo
from .phases import CATEGORIES, PhasePeak, PhaseTracker, state_bytes

FILE = "breakdown_step{step}_rank{rank}.json"


def check(cfg: Config) -> None:
    """What the tracker cannot follow, refused in one line before training starts."""
    if not cfg.memory.breakdown_steps:
        return
    if cfg.parallel.compile:
        raise ConfigError("memory.breakdown_steps: the tracker does not see inside compiled blocks; for the tracked "
                          "run set parallel.compile=false, or set memory.breakdown_steps=[]")


@dataclass
class Tracked:
    """What `track_step` yields; the trainer sets `seconds` (StepStats.seconds) before the block ends."""
    step: int
    active: bool
    seconds: float = 0.0
    phases: list[PhasePeak] = field(default_factory=list)


@contextmanager
def track_step(mcfg: MemoryConfig, info: DistInfo, run_dir: str | Path, step: int, model: nn.Module,
               optimizer: torch.optim.Optimizer, tracker: Any, batches: list[dict]) -> Iterator[Tracked]:
    """Around the trainer's step `step` (1-based): when it is in memory.breakdown_steps, measure it and write this
    rank's file; otherwise do nothing. `tracker`: the run's MemoryTracker, whose phase records close ours."""
    rec = Tracked(step, step in mcfg.breakdown_steps)
    if not rec.active:
        yield rec
        return
    device = info.device if info.device.type == "cuda" else None
    with PhaseTracker(model, optimizer, device) as pt:
        def close(name: str, micro: int | None) -> None:
            pt.close(step, name, micro)

        tracker.listeners.append(close)
        try:
            yield rec
        finally:
            tracker.listeners.remove(close)
        if not pt.phases or pt.phases[-1].phase != "optimizer":  # a skipped update records no optimizer phase
            pt.close(step, "optimizer")
        opt_state = state_bytes(optimizer, device)
    rec.phases = pt.phases
    shapes = [list(b["input_ids"].shape) for b in batches]
    write(Path(run_dir) / "memory" / FILE.format(step=step, rank=info.rank),
          summary(rec, info, opt_state, shapes, mcfg.imbalance_warn))


def summary(rec: Tracked, info: DistInfo, opt_state: int, shapes: list[list[int]], imbalance_warn: float) -> dict:
    peak = max(rec.phases, key=lambda p: p.total)
    return {"step": rec.step, "rank": info.rank, "world_size": info.world_size, "device": str(info.device),
            "seconds": rec.seconds, "micro_batches": shapes, "imbalance_warn": imbalance_warn,
            "categories": CATEGORIES, "optimizer_state": opt_state,
            "peak": {"phase": peak.phase, "total": peak.total, "by_category": peak.by_category},
            "category_max": {c: max(p.by_category[c] for p in rec.phases) for c in CATEGORIES},
            "phases": [dataclasses.asdict(p) for p in rec.phases]}


def write(path: Path, data: dict) -> None:
    """Written under a temporary name and renamed, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=1) + "\n")
