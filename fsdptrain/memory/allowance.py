"""The CUDA-only memory that neither the analytic terms nor the trace count, named on a line of its own.

torch's allocated bytes (what the estimate's terms, the fake trace and the
real-run breakdown all measure) leave out what a CUDA process holds besides
its tensors: the allocator's cached and fragmented blocks, the CUDA context,
NCCL's communication buffers and the kernels' workspaces (cuBLAS, attention).
The estimator allows for them with a fixed part and a share of the peak
(memory.estimate: RUNTIME_OVERHEAD, FRAGMENTATION); `fsdptrain estimate` and
`estimate --trace` print that allowance as its own line (cli).
"""

from __future__ import annotations

from ..core.units import format_bytes
from .estimate import FRAGMENTATION, RUNTIME_OVERHEAD

WHAT = (f"allocator caching/fragmentation {round((FRAGMENTATION - 1) * 100)}% of the peak + CUDA context, NCCL "
        f"buffers, kernel workspaces {format_bytes(RUNTIME_OVERHEAD)}")


def allowance_bytes(peak: int) -> int:
    """What the estimator adds to a peak of allocated bytes for the CUDA-only memory."""
    return int(peak * FRAGMENTATION + RUNTIME_OVERHEAD) - peak


def estimate_line(peak: int, gpu_memory: int) -> str:
    a = allowance_bytes(peak)
    return (f"CUDA-only allowance (not in the terms above): {format_bytes(a)} = {WHAT}; peak + allowance "
            f"{format_bytes(peak + a)} of {format_bytes(gpu_memory)}\n")


def trace_line(peaks: dict[str, int], gpu_memory: int) -> str:
    """`peaks`: traced peak per group of ranks (its label, e.g. 'ranks 0-14')."""
    parts = []
    for label, p in peaks.items():
        a = allowance_bytes(p)
        parts.append(f"{label} {format_bytes(a)} (traced peak + allowance {format_bytes(p + a)} of "
                     f"{format_bytes(gpu_memory)})")
    return f"CUDA-only allowance (not traced; {WHAT}): " + "; ".join(parts) + "\n"
