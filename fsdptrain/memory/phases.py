"""Peak memory by category and phase, real or fake tensors: the one wrapper around torch's FSDPMemTracker.

FSDPMemTracker attributes every live tensor of an FSDP2 model to a reference
type (sharded or gathered parameters, gradients, optimizer state, activations,
temporaries, all-gather and reduce-scatter buffers, ...). `PhaseTracker` keeps
the peak of each phase of a step (it restarts the tracker's running peak at
each phase end) and maps the reference types to the categories fsdptrain
reports (`CATEGORIES`). It works on real tensors on any device and on fake
tensors under a fake process group alike, selective checkpointing included
(see parallelize._PROFILER_OPS). Users: memory.breakdown (a real
run's step, memory.breakdown_steps) and, through the same categories,
memory.trace (`fsdptrain estimate --trace`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

# FSDPMemTracker's reference types -> the categories we report (in this order)
CATEGORY_OF = {
    "Sharded Param": "parameters (sharded)",
    "Unsharded Param": "parameters (gathered)",
    "Sharded Grad": "gradients (sharded)",
    "Unsharded Grad": "gradients (unsharded)",
    "OptState": "optimizer state",
    "Activation": "activations",
    "Temp": "temporaries",
    "All Gather": "collective buffers",
    "Reduce Scatter": "collective buffers",
    "Buffer": "buffers + inputs",
    "Inputs": "buffers + inputs",
}
CATEGORIES = list(dict.fromkeys(CATEGORY_OF.values()))


@dataclass
class PhasePeak:
    step: int  # 1-based
    phase: str  # forward #i | backward #i | optimizer
    total: int
    by_category: dict[str, int]
    # on fake tensors, step 1's clipping and optimizer run DTensor's sharding propagation for the first time
    # (then cached), and under the fake mode the tracker counts its tensors: that phase is left out of peaks
    warmup: bool = False

    @property
    def label(self) -> str:
        return f"step {self.step} {self.phase}"


def same_device(d: torch.device, device: Optional[torch.device]) -> bool:
    """Whether `d` is `device` (None: any; "cuda" without an index: any CUDA device)."""
    d = torch.device(d)
    return device is None or (d.type == device.type and (device.index is None or d.index == device.index))


def state_bytes(optimizer: torch.optim.Optimizer, device: Optional[torch.device] = None) -> int:
    """Bytes of the optimizer's state tensors (AdamW's each own their storage); on `device` only when given."""
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                local = v.to_local() if hasattr(v, "to_local") else v
                if same_device(local.device, device):
                    total += local.untyped_storage().nbytes()
    return total


def by_category(snapshot: dict, opt_state: int, device: Optional[torch.device] = None) -> tuple[int, dict[str, int]]:
    """A tracker snapshot (device -> reference type -> bytes) -> (total, bytes per category), summed over its
    devices or `device` alone. Tensors made while the optimizer steps are all labelled OptState by the tracker;
    what exceeds the real state (`opt_state`) is the update's temporaries."""
    out = dict.fromkeys(CATEGORIES, 0)
    total = 0
    for dev, dev_snap in snapshot.items():
        if not same_device(dev, device):
            continue
        for ref, n in dev_snap.items():
            name = getattr(ref, "value", ref)
            if name == "Total":
                total += n
                continue
            out[CATEGORY_OF.get(name, "temporaries")] += n
    if out["optimizer state"] > opt_state:
        out["temporaries"] += out["optimizer state"] - opt_state
        out["optimizer state"] = opt_state
    return total, out


class PhaseTracker:
    """FSDPMemTracker over `model` and `optimizer` keeping one peak per phase. Enter it around the steps and call
    `close(step, phase, i)` at the end of each phase; `phases` holds the peaks in order. `device`: count that
    device only (a CUDA run's host-side tensors, e.g. offloaded state, are left out); None: every device."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: Optional[torch.device] = None,
                 also: tuple[nn.Module, ...] = ()):
        self.model, self.optimizer, self.device, self.also = model, optimizer, device, also
        self.phases: list[PhasePeak] = []
        self.tracker = None

    def __enter__(self) -> PhaseTracker:
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

        # FSDP's lazy init (run by the first forward; a no-op after it) re-allocates the padded shard of a rank
        # whose rows are fewer than the padded size; done inside the tracker, those shards would count as activations.
        for m in (self.model, *self.also):
            m._get_fsdp_state()._lazy_init()
        self.tracker = FSDPMemTracker(self.model, self.optimizer)
        if self.also:
            # Other FSDP2 roots the step runs (a preference run's reference copy): the tracker instruments every
            # FSDP module under its root when entered (torch 2.13 fsdp2_mem_tracker._instrument_fsdp_module reads
            # _root_mod), so a plain container of both roots has it follow their shards, gathers and hooks alike;
            # neither model's FSDP state is touched.
            self.tracker._root_mod = nn.ModuleList([self.model, *self.also])
        self.tracker.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.tracker.__exit__(*exc)

    def forget_forwards(self) -> None:
        """Forget the modules' forward records (kept for their backward): the next forward of the same modules is
        then not taken for a second iteration (a preference run's reference forward through the policy)."""
        self.tracker.reset_mod_stats()

    def close(self, step: int, name: str, i: Optional[int] = None, warmup: bool = False) -> PhasePeak:
        """Record the peak since the previous close as phase `name` (#i) of `step`, and start the next phase."""
        t = self.tracker
        total, cats = by_category(t.get_tracker_snapshot("peak"), state_bytes(self.optimizer, self.device),
                                  self.device)
        peak = PhasePeak(step, name if i is None else f"{name} #{i}", total, cats, warmup)
        self.phases.append(peak)
        # FSDPMemTracker keeps one running peak; restart it from the live memory so each phase gets its own
        # (the same reset its __enter__ does).
        t._peak_mem_snap = t.get_tracker_snapshot()
        t._peak_mem = {d: s["Total"] for d, s in t._peak_mem_snap.items()}
        if name == "backward":  # its per-module stats allow one forward/backward per module; ours are kept
            t.reset_mod_stats()
        return peak
