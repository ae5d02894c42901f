"""Peak-memory backends: CUDA allocator statistics, or process RSS high-water mark on CPU.

On CPU `torch.cuda.memory_stats()` is empty, so we read VmHWM from
/proc/self/status and reset it by writing 5 to /proc/self/clear_refs, which
gives a per-interval peak just like `reset_peak_memory_stats` does on CUDA.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _read_status_kib(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
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
