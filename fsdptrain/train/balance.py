"""Work by speed (data.balance: speed): how fast each rank computes, and the share of a step's tokens it gets.

In synchronous sharded training every rank waits at each block's all-gather for the slowest one, so a rank's
wall time per step says nothing about its own speed. `ComputeClock` therefore times only compute: the forward
and the backward of every FSDP unit (transformer block), each from the moment FSDP2 has its gathered weights
(the all-gather waited for) to the end of the block's compute (before the reduce-scatter in the backward),
measured with the wall clock on CPU and with CUDA events on the GPU (the host's clock only sees kernel launches
there). Recomputed forwards under activation checkpointing count in the backward, on every rank alike. What it
leaves out (embeddings, the loss head, the optimizer step) is the same work on every rank or small beside it.

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
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.hooks import RemovableHandle

COMPUTE_FILE = "compute.json"  # output_dir/memory/: every rank's [compute seconds, tokens, steps] (mem report)


class ComputeClock:
    """Seconds this rank spends computing its blocks, forward and backward, FSDP2's collective waits excluded.

    The hooks are added after fully_shard's and are placed so that every interval lies inside FSDP2's own
    (torch/distributed/fsdp/_fully_shard/_fsdp_state.py and _fsdp_param_group.py):
    - forward: FSDP2's pre-forward hook is prepended, ours appended, so ours starts after the all-gather wait; its
      post-forward hook was registered before ours, so ours ends after it (it only frees the gathered weights).
    - backward start: FSDP2's post-forward registers `_pre_backward` (all-gather, wait for it) as a hook on each
      output tensor; ours, registered on the same tensors afterwards, runs after it (a tensor's hooks run in the
      order they were added). This needs the output FSDP2 hooked to be the one we see: no `output_dtype` in the
      MixedPrecisionPolicy (train/parallelize.py sets none).
    - backward end: FSDP2's pre-forward wraps the block's inputs in RegisterPostBackwardFunction, whose backward
      is the post-backward (reshard, reduce-scatter). Our pre-forward hook, after it, wraps the same inputs once
      more in `_BackwardEnd`: that node sits between the block's ops and FSDP2's, so autograd runs it once the
      block's input gradients are done (weight gradients are computed in the same nodes, and their accumulation
      runs first), before the reduce-scatter.
    Under activation checkpointing the recomputed forward runs inside the block's backward (it is triggered by the
    first saved tensor the backward unpacks, after the start hook), so it is timed there; the forward hooks it
    fires again are skipped. A block whose inputs need no gradient (no node after its backward: the first block
    over frozen embeddings) has its backward untimed, on every rank alike.
    CPU: the wall clock (a throttled rank's slowdown shows in it, not in its CPU time). GPU: CUDA events recorded
    on the current stream (the host only sees launches): in the backward the autograd engine makes the node's
    forward stream current for its hooks, and FSDP2's waits are stream waits, so the start event completes only
    after the all-gather has."""

    def __init__(self, blocks: list[nn.Module], device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = 0.0  # CPU: timed so far
        self._started: object = None  # the open forward interval's start mark (see _mark)
        self._back_started: object = None  # the open backward interval's
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # CUDA: (start, end) not yet read
        self._ends = False  # the block in forward now has a _BackwardEnd on its inputs
        self._handles: list[RemovableHandle] = []
        for block in blocks:
            self._handles.append(block.register_forward_pre_hook(self._begin, with_kwargs=True))
            self._handles.append(block.register_forward_hook(self._end))

    def _mark(self) -> object:
        """A start mark: a recorded CUDA event, or the wall clock."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _close(self, start: object) -> None:
        """Ends the interval that began at `start`."""
        if self.cuda:
            self._events.append((start, self._mark()))
        else:
            self.seconds += time.perf_counter() - start

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
        if in_backward():  # a checkpointed block's recomputation: part of the backward interval
            return None
        self._started = self._mark()
        self._ends = False
        if not torch.is_grad_enabled():
            return None
        flat, spec = tree_flatten((args, kwargs))
        where = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor) and x.requires_grad]
        if not where:
            return None
        self._ends = True
        marked = _BackwardEnd.apply(self, *(flat[i] for i in where))
        for i, t in zip(where, marked):
            flat[i] = t
        return tree_unflatten(flat, spec)

    def _end(self, module: nn.Module, args: tuple, output: object) -> None:
        if in_backward() or self._started is None:
            return
        self._close(self._started)
        self._started = None
        if self._ends:
            for t in tree_flatten(output)[0]:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(self._begin_backward)

    def _begin_backward(self, grad: torch.Tensor) -> None:
        if self._back_started is None:  # several outputs: the first gradient opens the interval
            self._back_started = self._mark()

    def _end_backward(self) -> None:
        if self._back_started is not None:
            self._close(self._back_started)
            self._back_started = None

    def take(self) -> float:
        """The compute seconds since the last take. On CUDA, call it after the step's host sync: the events have
        completed by then, so reading them waits for nothing."""
        if self.cuda:
            self.seconds += sum(a.elapsed_time(b) for a, b in self._events) / 1000.0
            self._events.clear()
        self._started = self._back_started = None  # open at a step's end: cut short by an error, never closed
        taken, self.seconds = self.seconds, 0.0
        return taken

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def in_backward() -> bool:
    """Whether autograd is running a backward on this thread (a checkpointed block recomputing its forward)."""
    return torch._C._current_graph_task_id() != -1


class _BackwardEnd(torch.autograd.Function):
    """Identity on a block's inputs whose backward ends the block's backward interval (see ComputeClock)."""

    @staticmethod
    def forward(ctx, clock: ComputeClock, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.clock = clock
        return inputs

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple:
        ctx.clock._end_backward()
        return (None, *grads)


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
    line = (f"time: compute per token (blocks, forward and backward) by rank [{us}] us; rank {slowest} computed "
            f"{per_step[slowest] / fastest:.2f}x as long per step as the fastest, and the other ranks waited about "
            f"{waited:.3f} s per step for it")
    if balancing:
        return line + " (data.balance: speed was on: its shares are in the balance lines above)"
    expected = sum(tok / n for _, tok, n in gathered) / sum(speeds) / per_step[slowest]
    return line + (f"; data.balance: speed would split each step's tokens by the ranks' speeds (the compute of a "
                   f"step about {expected:.2f}x of now)")
