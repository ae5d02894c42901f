"""CUDA allocator snapshots: record, dump, read safely, find the peak, group live memory by owner and site.

A snapshot is the dictionary `torch.cuda.memory._snapshot()` returns (and
`_dump_snapshot` pickles): `segments` (cudaMalloc'd ranges split into blocks,
each `active_allocated`, `active_awaiting_free` or `inactive`, with the Python
frames of the allocation when history was recorded) and `device_traces` (the
allocator's recent actions: alloc, free_completed, oom, ...).

Everything below the recording helpers works on plain dictionaries, so the
parsing, peak replay and grouping are tested on CPU with hand-built snapshots;
the recording itself needs CUDA.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..core.errors import UserError
from ..core.units import format_bytes

SHARDED, GATHERED = "parameters (sharded)", "parameters (gathered)"
# sharded: this rank's own (fp32) parameter shards; gathered: FSDP's all-gathered (bf16) copies of the units
# running forward or backward, which replace the sharded parameters in the modules while they run.
OWNERS = [SHARDED, GATHERED, "gradients", "optimizer state", "activations", "other"]


# ----------------------------------------------------------------------------- recording (CUDA)


def start_recording(max_entries: int) -> None:
    """Record every allocation with its Python stack (C++ stacks would make dumps take minutes)."""
    torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks="python")


def stop_recording() -> None:
    torch.cuda.memory._record_memory_history(enabled=None)


def dump(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.cuda.memory._dump_snapshot(str(path))


# ----------------------------------------------------------------------------- reading


class _NoGlobals(pickle.Unpickler):
    """Snapshots are dicts, lists, tuples, strings and numbers: refuse anything that would import code."""

    def find_class(self, module: str, name: str):  # noqa: D401
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (a memory snapshot holds only plain data)")


def load(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: snapshot file not found")
    try:
        snap = _NoGlobals(io.BytesIO(p.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise UserError(f"{path}: not a PyTorch memory snapshot pickle ({e})") from None
    if not isinstance(snap, dict) or "segments" not in snap:
        raise UserError(f"{path}: not a PyTorch memory snapshot (no 'segments'; write one with "
                        "torch.cuda.memory._dump_snapshot or memory.snapshot_steps)")
    return snap


# ----------------------------------------------------------------------------- live blocks and the peak


@dataclass
class Block:
    addr: int
    size: int
    frames: list = field(default_factory=list)


def live_blocks(snap: dict, device: Optional[int] = None) -> list[Block]:
    """Allocated blocks at the moment the snapshot was taken (on `device` only, when given)."""
    out = []
    for seg in snap.get("segments", []):
        if device is not None and int(seg.get("device", device)) != device:
            continue
        for b in seg.get("blocks", []):
            if b.get("state") == "active_allocated":
                out.append(Block(int(b["address"]), int(b["size"]), list(b.get("frames") or [])))
    return out


def trace_device(snap: dict) -> int:
    """The device whose trace records this process's allocations.

    `torch.cuda.memory._snapshot()` holds one trace per visible device, and a
    rank records into its own device's (rank r of a node: index r), so device 0's
    trace is empty on every other rank. The segments name their device; without
    segments, the first trace that holds events is this process's."""
    devices: dict[int, int] = {}
    for seg in snap.get("segments", []):
        if "device" in seg:
            d = int(seg["device"])
            devices[d] = devices.get(d, 0) + int(seg.get("total_size", 0))
    if devices:  # a process that touched several devices: the one holding most memory
        return max(devices, key=lambda d: (devices[d], -d))
    traces = snap.get("device_traces") or []
    return next((i for i, t in enumerate(traces) if t), 0)


def live_at_peak(snap: dict, device: Optional[int] = None) -> tuple[list[Block], int]:
    """The allocated blocks when allocated memory peaked within the recorded trace, and that total.

    Walk the trace backwards from the final state: undoing an `alloc` removes
    its block, undoing a `free_completed` puts it back. This needs no state
    from before the (ring-buffered) trace began. device: whose trace to replay
    (default: the snapshot's own, `trace_device`).
    """
    device = trace_device(snap) if device is None else device
    live = {b.addr: b for b in live_blocks(snap, device)}
    total = sum(b.size for b in live.values())
    best, best_total = dict(live), total
    traces = snap.get("device_traces") or []
    trace = traces[device] if device < len(traces) else []
    for ev in reversed(trace):
        action = ev.get("action")
        if action == "alloc":
            b = live.pop(int(ev["addr"]), None)
            if b is not None:
                total -= b.size
        elif action == "free_completed":
            addr = int(ev["addr"])
            if addr not in live:
                live[addr] = Block(addr, int(ev["size"]), list(ev.get("frames") or []))
                total += int(ev["size"])
        else:
            continue
        if total > best_total:
            best, best_total = dict(live), total
    return list(best.values()), best_total


# ----------------------------------------------------------------------------- where a block came from


def _frame_text(fr: dict) -> str:
    name = str(fr.get("filename", "?"))
    for marker in ("site-packages/", "dist-packages/"):
        if marker in name:
            name = name.split(marker, 1)[1]
    return f"{name}:{fr.get('line', '?')} ({fr.get('name', '?')})"


def _is_internal(filename: str) -> bool:
    return "/torch/" in filename or filename.startswith("<")


def site(frames: list) -> str:
    """The allocation site: the innermost frame outside torch itself (model or trainer code)."""
    if not frames:
        return "<no Python stack: autograd engine, C++ or allocated before recording>"
    for fr in frames:
        if not _is_internal(str(fr.get("filename", ""))):
            return _frame_text(fr)
    return _frame_text(frames[0])


def owner_from_frames(frames: list) -> Optional[str]:
    """Guess the owner of a block from its stack when its address is not a known tensor."""
    text = " ".join(f"{fr.get('filename', '')}:{fr.get('name', '')}" for fr in frames)
    if "torch/optim/" in text:
        return "optimizer state"
    if "foreach_reduce" in text or "reduce_scatter" in text:
        return "gradients"
    if "foreach_all_gather" in text or "_fsdp_param" in text or "alloc_storage" in text:
        return GATHERED  # the shards are known by address: an unknown FSDP parameter buffer is a gathered one
    if ":backward" in text or "autograd" in text:
        return "gradients" if "accumulate" in text else "activations"
    if "forward" in text:
        return "activations"
    return None


Range = tuple[int, int, str, str]  # start, end, owner, tensor name


def fsdp_param_groups(model: torch.nn.Module) -> list:
    """FSDP2's parameter groups (torch's FSDPParamGroup) of the fully_shard-ed modules in `model`. Their
    `fsdp_params` know each parameter's sharded tensor and its all-gather outputs, whichever of the two the
    module holds at the moment (torch 2.13, torch/distributed/fsdp/_fully_shard/_fsdp_param.py)."""
    groups = []
    for m in model.modules():
        get_state = getattr(m, "_get_fsdp_state", None)
        group = getattr(get_state(), "_fsdp_param_group", None) if get_state is not None else None
        if group is not None:
            groups.append(group)
    return groups


def _fsdp_param_name(fp, module_names: dict[int, str]) -> str:
    """The parameter's name in the model (FSDP sets _param_fqn at its lazy init, before the first forward)."""
    if getattr(fp, "_param_fqn", None):
        return fp._param_fqn
    info = fp._module_info
    prefix = module_names.get(id(info.module), "")
    return f"{prefix}.{info.param_name}" if prefix else info.param_name


def owner_ranges(model: Optional[torch.nn.Module], optimizer: Optional[torch.optim.Optimizer]) -> list[Range]:
    """(start, end, owner, name) of the storages of parameters (local shards and FSDP's gathered copies),
    gradients and optimizer state.

    FSDP-managed parameters come from FSDP's own records, not from `named_parameters()`: while a unit runs,
    its modules hold the gathered copies, so the registered parameters would count the gathered (bf16) bytes as
    the parameters and leave the (fp32) shards unknown."""
    ranges: list[Range] = []

    def add(t: Optional[torch.Tensor], owner: str, name: str) -> None:
        if t is None or not isinstance(t, torch.Tensor):
            return
        local = getattr(t, "_local_tensor", t)  # DTensor -> this rank's shard
        try:
            st = local.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        if st.nbytes() and st.data_ptr():  # a freed all-gather output has a storage of 0 bytes
            ranges.append((st.data_ptr(), st.data_ptr() + st.nbytes(), owner, name))

    names: dict[int, str] = {}
    if model is not None:
        managed = add_fsdp_params(model, add, names)
        for n, p in model.named_parameters():
            if id(p) in managed:
                continue
            names[id(p)] = n
            add(p, SHARDED, f"{n} (local shard)")
            add(p.grad, "gradients", f"grad of {n}")
    if optimizer is not None:
        for p, state in optimizer.state.items():
            for k, v in state.items():
                add(v, "optimizer state", f"{k} of {names.get(id(p), 'a parameter')}")
    merged: dict[tuple[int, int, str], list[str]] = {}  # FSDP keeps a unit's reduced gradients in one buffer
    for start, end, owner, name in ranges:
        merged.setdefault((start, end, owner), []).append(name)
    return sorted((s, e, o, n[0] if len(n) == 1 else f"{n[0]} (+{len(n) - 1} more in this buffer)")
                  for (s, e, o), n in merged.items())


def add_fsdp_params(model: torch.nn.Module, add, names: dict[int, str]) -> set[int]:
    """Add the ranges of every FSDP-managed parameter through `add(tensor, owner, name)`; fills `names` (id of the
    sharded parameter, the optimizer's key -> name). Returns the ids of every parameter object FSDP may have
    registered in the modules (sharded, gathered, post-forward), which named_parameters() must not count again."""
    module_names = {id(m): n for n, m in model.named_modules()}
    managed: set[int] = set()
    for group in fsdp_param_groups(model):
        pending = getattr(group, "_all_gather_result", None)  # the flat all-gather output, before its copy-out
        if pending is not None:
            add(pending.all_gather_output, GATHERED, "all-gather buffer of an FSDP unit")
        for fp in group.fsdp_params:
            name = _fsdp_param_name(fp, module_names)
            sharded = fp.sharded_param
            unsharded = getattr(fp, "_unsharded_param", None)  # a view of the all-gather output, once gathered
            post_forward = getattr(fp, "_sharded_post_forward_param", None)
            managed.update(id(p) for p in (sharded, unsharded, post_forward) if p is not None)
            names[id(sharded)] = name
            add(sharded, SHARDED, f"{name} (local shard)")
            add(sharded.grad, "gradients", f"grad of {name}")
            for t in [*fp.all_gather_outputs, *getattr(fp, "_unsharded_inner_tensors", [])]:
                add(t, GATHERED, f"{name} (gathered)")
            add(getattr(fp, "_sharded_post_forward_param_data", None), GATHERED, f"{name} (post-forward shard)")
            if unsharded is not None:
                add(unsharded.grad, "gradients", f"unsharded grad of {name}")
            add(getattr(fp, "unsharded_accumulated_grad", None), "gradients", f"accumulated grad of {name}")
    return managed


def classify(block: Block, ranges: list[Range]) -> tuple[str, str]:
    """(owner, description) of a block: a known tensor by address, else a guess from its stack."""
    for start, end, owner, name in ranges:  # a few ranges per parameter; fine at post-mortem time
        if start < block.addr + block.size and block.addr < end:
            return owner, name
    return owner_from_frames(block.frames) or "other", site(block.frames)


def group(blocks: Iterable[Block], ranges: list[Range]) -> dict[str, dict]:
    """owner -> {"bytes", "count", "blocks": [(size, description), ...] largest first}."""
    out = {o: {"bytes": 0, "count": 0, "blocks": []} for o in OWNERS}
    for b in blocks:
        owner, what = classify(b, ranges)
        g = out[owner]
        g["bytes"] += b.size
        g["count"] += 1
        g["blocks"].append((b.size, what))
    for g in out.values():
        g["blocks"].sort(key=lambda x: -x[0])
    return out


def by_site(blocks: Iterable[Block]) -> dict[str, int]:
    out: dict[str, int] = {}
    for b in blocks:
        s = site(b.frames)
        out[s] = out.get(s, 0) + b.size
    return out


def postmortem_text(rank: int, step: int, where: str, error: str, stats: dict, groups: dict[str, dict],
                    top: int = 15) -> str:
    """The readable post-mortem: totals, memory by owner, the largest live allocations with their source lines."""
    lines = [f"fsdptrain out-of-memory post-mortem: rank {rank}, step {step}, {where}",
             f"error: {error.strip().splitlines()[0] if error.strip() else '?'}", ""]
    alloc, reserved = stats.get("allocated", 0), stats.get("reserved", 0)
    lines.append(f"allocated {format_bytes(alloc)}, reserved {format_bytes(reserved)}, "
                 f"peak allocated {format_bytes(stats.get('allocated_peak', 0))}, "
                 f"fragmentation (inactive split) {format_bytes(stats.get('inactive_split', 0))}, "
                 f"alloc retries {stats.get('num_alloc_retries', 0)}, OOMs {stats.get('num_ooms', 0)}")
    total = sum(g["bytes"] for g in groups.values()) or 1
    lines += ["", "live memory by owner:", f"  {'owner':<21} {'bytes':>12} {'share':>6} {'blocks':>7}"]
    for owner in OWNERS:
        g = groups[owner]
        lines.append(f"  {owner:<21} {format_bytes(g['bytes']):>12} {100 * g['bytes'] / total:5.1f}% {g['count']:>7}")
    allb = sorted(((s, o, where_) for o, g in groups.items() for s, where_ in g["blocks"]), key=lambda x: -x[0])
    lines += ["", f"largest live allocations (top {min(top, len(allb))}):"]
    for size, owner, src in allb[:top]:
        lines.append(f"  {format_bytes(size):>12}  {owner:<21} {src}")
    lines += ["", "next: `fsdptrain estimate CONFIG` for what each term should be; "
              "`fsdptrain mem report RUN_DIR` to compare ranks; open the .pickle in https://pytorch.org/memory_viz"]
    return "\n".join(lines) + "\n"
