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


def available_host_bytes() -> Optional[int]:
    """The memory this node can still give without swapping (MemAvailable of /proc/meminfo), or None where there is
    no such file."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
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
