"""Memory backends: CUDA caching-allocator statistics, or process RSS on CPU, in one schema.

`sample(device)` returns the fields every memory record carries (see SCHEMA).
On CUDA they come from `torch.cuda.memory_stats()`: allocated, reserved,
active and inactive-split bytes (current and peak since the last reset),
`num_alloc_retries` and `num_ooms`. On CPU `memory_stats()` is empty, so we
read VmRSS (current) and VmHWM (peak) from /proc/self/status and reset the
peak by writing 5 to /proc/self/clear_refs, which gives a per-interval peak
just like `reset_peak_memory_stats` does on CUDA. On CPU allocated, reserved
and active are all the resident set (there is no caching allocator to tell
them apart) and fragmentation, retries and OOM counts are 0. CUDA records
carry the resident set too (HOST_FIELDS), with its peak reset the same way:
host memory is where offload runs fill up.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

# (record field, CUDA memory_stats key): current and peak of each.
_POOLS = [("allocated", "allocated_bytes.all"), ("reserved", "reserved_bytes.all"),
          ("active", "active_bytes.all"), ("inactive_split", "inactive_split_bytes.all")]
SCHEMA = [f for name, _ in _POOLS for f in (name, f"{name}_peak")] + ["num_alloc_retries", "num_ooms"]
HOST_FIELDS = ["host_rss", "host_rss_peak"]  # CUDA records: the process's resident host memory, current and peak


_FDS: dict[tuple[int, str], int] = {}  # (pid, path) -> open fd: /proc reads without open/close per phase


def _proc_fd(path: str, flags: int) -> int:
    key = (os.getpid(), path)  # a forked child must not read its parent's /proc/self
    fd = _FDS.get(key)
    if fd is None:
        fd = _FDS[key] = os.open(path, flags)
    return fd


def _status_text() -> str:
    return os.pread(_proc_fd("/proc/self/status", os.O_RDONLY), 8192, 0).decode(errors="replace")


def _read_status_kib(field: str) -> int:
    try:
        for line in _status_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def available_host_bytes(meminfo: str = "/proc/meminfo", cgroups: str = "/proc/self/cgroup",
                         root: str = "/sys/fs/cgroup") -> Optional[tuple[int, str]]:
    """What this node can still give this process without swapping or the out-of-memory killer, and where that
    number comes from: the node's MemAvailable (/proc/meminfo), or, when lower, what this process's memory cgroup
    still allows (a Slurm job's or a container's limit less its usage). None where neither can be read."""
    found: list[tuple[int, str]] = []
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append((int(line.split()[1]) * 1024, "MemAvailable"))
    except (OSError, ValueError, IndexError):
        pass
    headroom = cgroup_headroom(cgroups, root)
    if headroom is not None:
        found.append((headroom, "the memory cgroup's limit less its usage"))
    return min(found) if found else None


def cgroup_headroom(cgroups: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> Optional[int]:
    """Limit less usage of this process's memory cgroup, the least over it and its ancestors that set a limit
    (cgroup v1's memory controller, else v2's unified hierarchy); None where no level sets one."""
    try:
        lines = Path(cgroups).read_text().splitlines()
    except OSError:
        return None
    v1 = v2 = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[1] == "":
            v2 = parts[2]
        elif len(parts) == 3 and "memory" in parts[1].split(","):
            v1 = parts[2]
    if v1 is not None:
        base, path, names = Path(root) / "memory", v1, ("memory.limit_in_bytes", "memory.usage_in_bytes")
    elif v2 is not None:
        base, path, names = Path(root), v2, ("memory.max", "memory.current")
    else:
        return None
    best: Optional[int] = None
    d = base / path.lstrip("/")
    while True:
        limit, usage = _read_number(d / names[0]), _read_number(d / names[1])
        if limit is not None and usage is not None and limit < 1 << 60:  # v2 "max", v1's page-rounded 2**63
            best = limit - usage if best is None else min(best, limit - usage)
        if d == base or base not in d.parents:
            break
        d = d.parent
    return None if best is None else max(0, best)


def _read_number(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):  # missing, or "max"
        return None


def reset_peak(device: torch.device) -> None:
    """Start a new interval: the allocator's peaks on CUDA, and the process's resident peak on either device."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        os.write(_proc_fd("/proc/self/clear_refs", os.O_WRONLY), b"5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def peak_bytes(device: torch.device) -> int:
    """Peak since the last reset: CUDA allocated bytes, or process resident bytes on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return _read_status_kib("VmHWM") * 1024


def current_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return _read_status_kib("VmRSS") * 1024


def from_cuda_stats(stats: dict) -> dict[str, int]:
    """The SCHEMA fields from a `torch.cuda.memory_stats()` dictionary."""
    out: dict[str, int] = {}
    for name, key in _POOLS:
        out[name] = int(stats.get(f"{key}.current", 0))
        out[f"{name}_peak"] = int(stats.get(f"{key}.peak", 0))
    out["num_alloc_retries"] = int(stats.get("num_alloc_retries", 0))
    out["num_ooms"] = int(stats.get("num_ooms", 0))
    return out


def from_proc_status(text: str) -> dict[str, int]:
    """The SCHEMA fields from /proc/self/status text (CPU runs)."""
    kib = {}
    for key in ("VmHWM", "VmRSS"):
        i = text.find(key + ":")
        if i >= 0:
            kib[key] = int(text[i + len(key) + 1:text.find("kB", i)]) * 1024
    cur, peak = kib.get("VmRSS", 0), kib.get("VmHWM", 0)
    out = {}
    for name, _ in _POOLS:
        out[name], out[f"{name}_peak"] = (0, 0) if name == "inactive_split" else (cur, max(cur, peak))
    out["num_alloc_retries"] = 0
    out["num_ooms"] = 0
    return out


def sample(device: torch.device) -> dict[str, int]:
    """Current and peak-since-reset memory of this process on `device`, as SCHEMA fields; on CUDA also the
    process's host memory (HOST_FIELDS: what offload, the data and the pinned buffers hold)."""
    try:
        text = _status_text()
    except OSError:
        text = ""
    if device.type == "cuda":
        host = from_proc_status(text)
        return {**from_cuda_stats(torch.cuda.memory_stats(device)), "host_rss": host["allocated"],
                "host_rss_peak": host["allocated_peak"]}
    return from_proc_status(text)
