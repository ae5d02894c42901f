"""The host staging layout of the CPU-offloaded optimizer, in plain arithmetic (no torch).

`train.optim_offload` stages each parameter group's gradients and fp32 shards in host memory in chunks of
CHUNK_BYTES; each chunk is one flat buffer per kind, pinned on CUDA. CUDA's caching host allocator rounds
every pinned request up to a power of two (ATen's CachingHostAllocator with its default
pinned_max_round_threshold), so the layout decides how much host memory the staging really takes. The memory
estimator counts it with the same functions.
"""

from __future__ import annotations

CHUNK_BYTES = 64 * 2**20  # host staging granularity: big enough for foreach, small enough to pipeline
STAGING_DTYPE_BYTES = 4  # the host copies are fp32 whatever the parameters' dtype


def staging_chunks(numels: list[int], limit: int = CHUNK_BYTES) -> list[list[int]]:
    """Positions of a group's parameters (given by their local sizes, in order) in consecutive chunks of at most
    `limit` bytes of fp32; a parameter larger than `limit` gets a chunk of its own."""
    out: list[list[int]] = []
    size = 0
    for i, n in enumerate(numels):
        n *= STAGING_DTYPE_BYTES
        if not out or (out[-1] and size + n > limit):
            out.append([])
            size = 0
        out[-1].append(i)
        size += n
    return out


def pinned_size(nbytes: int) -> int:
    """Bytes CUDA's caching host allocator reserves for a pinned request of `nbytes`: the next power of two."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


def staging_bytes(numels: list[int], pinned: bool, limit: int = CHUNK_BYTES) -> int:
    """Host bytes of one group's staging (a gradient and a shard buffer per chunk), rounded as the pinned
    allocator does when `pinned`."""
    sizes = [sum(numels[i] for i in chunk) * STAGING_DTYPE_BYTES for chunk in staging_chunks(numels, limit)]
    return 2 * sum(pinned_size(n) if pinned else n for n in sizes)


MIN_SLOTS = 3  # optimizer_offload nvme: read-ahead, update, write-behind
NVME_ALIGN = 4096  # bytes: direct I/O needs file offsets, lengths and buffer addresses on the drive's blocks


def nvme_chunk_limit(buffer_bytes: int) -> int:
    """optimizer_offload nvme: fp32 bytes of parameters per chunk: CHUNK_BYTES, or less so that MIN_SLOTS chunks
    of both moments fit parallel.offload_buffer_size."""
    return max(STAGING_DTYPE_BYTES, min(CHUNK_BYTES, buffer_bytes // (2 * MIN_SLOTS)))


def nvme_slots(buffer_bytes: int, largest_chunk_numel: int, most_chunks: int) -> int:
    """optimizer_offload nvme: how many chunk buffers (both moments each) stream the state: what the buffer size
    pays for, at least MIN_SLOTS, at most a group's number of chunks (the pipeline's length)."""
    per_slot = max(1, 2 * STAGING_DTYPE_BYTES * largest_chunk_numel)
    return min(max(MIN_SLOTS, buffer_bytes // per_slot), max(MIN_SLOTS, most_chunks))


def nvme_buffer_bytes(groups: list[list[int]], buffer_bytes: int) -> int:
    """optimizer_offload nvme: host bytes of the moments' stream buffers for parameter groups of these local
    sizes: per buffer both moments of the largest chunk rounded up to NVME_ALIGN, and NVME_ALIGN more to align
    its address (train.optim_nvme.aligned_buffer)."""
    limit = nvme_chunk_limit(buffer_bytes)
    chunks = [[sum(numels[i] for i in c) for c in staging_chunks(numels, limit)] for numels in groups if numels]
    largest = max((n for group in chunks for n in group), default=0)
    slots = nvme_slots(buffer_bytes, largest, max((len(c) for c in chunks), default=0))
    span = -(-2 * STAGING_DTYPE_BYTES * largest // NVME_ALIGN) * NVME_ALIGN
    return slots * (span + NVME_ALIGN) if largest else 0
