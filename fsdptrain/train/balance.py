"""Work by speed (data.balance: speed): how fast each rank computes, and the share of a step's tokens it gets.

In synchronous sharded training every rank waits at each block's all-gather for the slowest one, so a rank's
wall time per step says nothing about its own speed. `ComputeClock` therefore times only compute: the forward
of every FSDP unit (transformer block), from the moment FSDP2's pre-forward hook has its gathered weights (the
all-gather waited for) to the end of the block's forward, measured with the wall clock on CPU and with CUDA
events on the GPU (the host's clock only sees kernel launches there). The backward is taken to scale with the
forward; recomputed forwards under activation checkpointing are counted too, on every rank alike.

`SpeedBalance` turns those times into shares: every `every` steps (the first time after `first` steps) the ranks
exchange their compute seconds and tokens (one small all_gather), each rank's speed is tokens per compute second,
and the shares become the measured speeds' shares (the first time: the starting shares were a guess), later the
mean of the old shares and the measured ones (smoothing one noisy window).
Every rank computes the same shares from the same gathered numbers, and they take effect at the next step
boundary (data/loader.py cuts each step's global batch by them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

COMPUTE_FILE = "compute.json"  # output_dir/memory/: every rank's [compute seconds, tokens, steps] (mem report)


class ComputeClock:
    """Seconds this rank spends in its blocks' forwards, collective waits excluded. Hooks are added after
    fully_shard's, so they run inside FSDP2's: after the pre-forward's all-gather wait, after the post-forward."""

    def __init__(self, blocks: list[nn.Module], device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = 0.0  # CPU: timed so far
        self._started: Optional[float] = None
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # CUDA: (start, end) not yet read
        self._open: Optional[torch.cuda.Event] = None
        self._handles: list[RemovableHandle] = []
        for block in blocks:
            self._handles.append(block.register_forward_pre_hook(self._begin))
            self._handles.append(block.register_forward_hook(self._end))

    def _begin(self, module: nn.Module, args: tuple) -> None:
        if self.cuda:
            self._open = torch.cuda.Event(enable_timing=True)
            self._open.record()
        else:
            self._started = time.perf_counter()

    def _end(self, module: nn.Module, args: tuple, output: object) -> None:
        if self.cuda:
            if self._open is not None:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._events.append((self._open, end))
                self._open = None
        elif self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None

    def take(self) -> float:
        """The compute seconds since the last take. On CUDA, call it after the step's host sync: the events have
        completed by then, so reading them waits for nothing."""
        if self.cuda:
            self.seconds += sum(a.elapsed_time(b) for a, b in self._events) / 1000.0
            self._events.clear()
        taken, self.seconds = self.seconds, 0.0
        return taken

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@dataclass
class SpeedBalance:
    """The ranks' shares of a step's tokens, from their measured speeds."""

    shares: list[float]  # current shares (sum 1), identical on every rank
    every: int = 20  # steps between measurements
    first: int = 3  # the first measurement after this many steps (step 1 carries one-time costs: skipped)
    seconds: float = 0.0  # this rank's compute seconds in the current window
    tokens: float = 0.0  # this rank's input tokens in the current window
    measured: list[list[float]] = field(default_factory=list)  # per measurement: every rank's tokens per second

    def add(self, step: int, seconds: float, tokens: int) -> None:
        """This rank's compute seconds and input tokens of optimizer step `step` (1-based)."""
        if step > 1:  # step 1 compiles, allocates and warms caches
            self.seconds += seconds
            self.tokens += tokens

    def due(self, step: int) -> bool:
        """Whether the ranks measure after `step` (every rank decides the same)."""
        return step == self.first or (step > self.first and (step - self.first) % self.every == 0)

    def update(self, gathered: list[list[float]]) -> list[float]:
        """New shares from every rank's [compute seconds, tokens] of the window (the all_gather's rows)."""
        speeds = [tok / sec if sec > 0 else 0.0 for sec, tok in gathered]
        self.measured.append(speeds)
        self.seconds = self.tokens = 0.0
        if min(speeds) <= 0:  # a rank timed nothing (no blocks found, or an empty window): keep the shares
            return self.shares
        total = sum(speeds)
        if len(self.measured) == 1:  # the starting shares were a guess, not a measurement: take the measured ones
            self.shares = [s / total for s in speeds]
        else:
            self.shares = [0.5 * old + 0.5 * s / total for old, s in zip(self.shares, speeds)]
        return self.shares


@dataclass
class ComputeTotals:
    """This rank's compute seconds and input tokens over the run's steps after the first (for the time report)."""

    seconds: float = 0.0
    tokens: float = 0.0
    steps: int = 0

    def add(self, step: int, seconds: float, tokens: int) -> None:
        if step > 1:
            self.seconds += seconds
            self.tokens += tokens
            self.steps += 1


def time_report(gathered: list[list[float]], balancing: bool, threshold: float = 1.1) -> Optional[str]:
    """One line on which rank the others waited for, from every rank's [compute seconds, tokens, steps] over the
    run (ComputeTotals, all-gathered), when the slowest rank's compute per step is `threshold` times the fastest's or
    more; None otherwise. Each step every rank waits, at the blocks' all-gathers, until the slowest has computed:
    about the slowest's compute per step less its own. Weighting each rank's tokens by its speed would make a
    step's compute the step's tokens over the ranks' summed speeds, instead of the slowest rank's time."""
    if len(gathered) < 2 or min(steps for _, _, steps in gathered) < 1 or min(s for s, _, _ in gathered) <= 0:
        return None
    per_step = [s / n for s, _, n in gathered]
    slowest, fastest = max(range(len(per_step)), key=per_step.__getitem__), min(per_step)
    if per_step[slowest] < threshold * fastest:
        return None
    waited = sum(per_step[slowest] - t for t in per_step) / (len(per_step) - 1)
    speeds = [tok / s for s, tok, _ in gathered]
    us = ", ".join(f"{1e6 / v:.1f}" for v in speeds)
    line = (f"time: compute per token (block forwards) by rank [{us}] us; rank {slowest} computed "
            f"{per_step[slowest] / fastest:.2f}x as long per step as the fastest, and the other ranks waited about "
            f"{waited:.3f} s per step for it")
    if balancing:
        return line + " (data.balance: speed was on: its shares are in the balance lines above)"
    expected = sum(tok / n for _, tok, n in gathered) / sum(speeds) / per_step[slowest]
    return line + (f"; data.balance: speed would split each step's tokens by the ranks' speeds (the compute of a "
                   f"step about {expected:.2f}x of now)")
