"""Collectives that complete at issue, for the workers that compare a real gloo run with a fake trace or with
another measurement of the same step (trace_cases, breakdown_cases).

gloo completes a collective on a worker thread, which holds the collective's tensors until it drops the
finished work; a memory tracker then counts an all-gather or reduce-scatter buffer in some phases and not in
others, run to run. The fake process group completes every collective at once. `settled_collectives()`, called
before the process group exists, makes gloo do the same: one worker thread per group, and each collective
waited on at issue and followed by a barrier (which that one thread runs only after it has dropped the
collective's work and tensors).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d


class OneThreadGloo(c10d.ProcessGroupGloo):
    """gloo with one worker thread: when a later collective completes, the thread has let go of every earlier
    one (it drops a finished work before it takes the next)."""

    def __init__(self, store, rank: int, size: int, timeout=None):
        opts = c10d.ProcessGroupGloo._Options()
        opts._threads = 1
        opts._devices = [c10d.ProcessGroupGloo.create_default_device()]
        if timeout is not None:
            opts._timeout = timeout
        super().__init__(store, rank, size, opts)


def settle(collective: Callable) -> Callable:
    """The collective, waited on at issue and followed by a barrier on its group (which the one gloo thread
    runs only after it has dropped the collective's work and tensors); an async caller gets the finished work."""

    @functools.wraps(collective)
    def settled(*args, async_op: bool = False, **kwargs):
        work = collective(*args, async_op=True, **kwargs)
        work.wait()
        (kwargs.get("group") or c10d._get_default_group()).barrier().wait()
        return work if async_op else None

    return settled


def settled_collectives() -> None:
    """Before the process group exists: gloo groups with one thread, FSDP's collectives settled at issue."""
    c10d.ProcessGroupGloo = OneThreadGloo
    for name in ("all_gather_single", "reduce_scatter_single", "all_reduce", "all_gather_into_tensor",
                 "reduce_scatter_tensor"):
        setattr(dist, name, settle(getattr(dist, name)))
