"""The host staging layout of the CPU-offloaded optimizer, in plain arithmetic (no torch).

`train.optim_offload` stages each parameter group's gradients and fp32 shards in host memory in chunks of
CHUNK_BYTES (the unit of the copies' overlap with the update), views of slabs of up to SLAB_BYTES: one flat
buffer per slab and kind, pinned on CUDA. CUDA's caching host allocator rounds every pinned request up to a power
of two (ATen's CachingHostAllocator with its default pinned_max_round_threshold), so the layout decides how much
host memory the staging really takes. With `optimizer_offload: nvme` (`train.optim_nvme`) no staging persists:
each of a few stream buffers holds one chunk's moments, gradients and shards at a time. The memory estimator
counts both with the same functions.
"""

from __future__ import annotations

CHUNK_BYTES = 64 * 2**20  # host staging granularity: big enough for foreach, small enough to pipeline
SLAB_BYTES = 1 << 30  # host staging allocations: several chunks each (a power of two, so a full one is not rounded)
STAGING_DTYPE_BYTES = 4  # the host copies are fp32 whatever the parameters' dtype


def pack(sizes: list[int], limit: int) -> list[list[int]]:
    """Positions of `sizes` (in order) in consecutive groups of at most `limit` in total; a size larger than
    `limit` gets a group of its own."""
    out: list[list[int]] = []
    total = 0
    for i, n in enumerate(sizes):
        if not out or (out[-1] and total + n > limit):
            out.append([])
            total = 0
        out[-1].append(i)
        total += n
    return out


def staging_chunks(numels: list[int], limit: int = CHUNK_BYTES) -> list[list[int]]:
    """Positions of a group's parameters (given by their local sizes, in order) in consecutive chunks of at most
    `limit` bytes of fp32; a parameter larger than `limit` gets a chunk of its own."""
    return pack([n * STAGING_DTYPE_BYTES for n in numels], limit)


def staging_slabs(chunk_bytes: list[int], slab: int | None = None) -> list[list[int]]:
    """Positions of a group's chunks (given by their bytes, in order) in the slabs they are views of: one
    allocation per slab and kind (gradients, shards). Per chunk, CUDA's pinned allocator would round each request up
    to a power of two (up to 2x). A slab takes consecutive chunks up to the largest power of two that is at most
    what is left to place and at most `slab` (SLAB_BYTES): it closes only when the next chunk would pass that size,
    so it rounds up to it at most, by less than a chunk; what is left goes into smaller slabs the same way (a chunk
    larger than that size gets a slab of its own). Where chunks of sizes that are powers of two already interleave
    so that this packing reserves more (e.g. 8, 64, 64, 1, 64 MiB: 320 MiB against 201), each chunk keeps its own."""
    limit = SLAB_BYTES if slab is None else slab
    packed = _pack_slabs(chunk_bytes, limit)
    alone = [[i] for i in range(len(chunk_bytes))]  # one slab per chunk, as before slabs: never worse than that

    def reserved(groups: list[list[int]]) -> int:
        return sum(pinned_size(sum(chunk_bytes[i] for i in g)) for g in groups)

    return alone if reserved(alone) < reserved(packed) else packed


def _pack_slabs(chunk_bytes: list[int], limit: int) -> list[list[int]]:
    out: list[list[int]] = []
    left = sum(chunk_bytes)
    i = 0
    while i < len(chunk_bytes):
        cap = min(limit, 1 << (left.bit_length() - 1)) if left > 0 else 0
        group, total = [i], chunk_bytes[i]
        i += 1
        while i < len(chunk_bytes) and total + chunk_bytes[i] <= cap:
            total += chunk_bytes[i]
            group.append(i)
            i += 1
        out.append(group)
        left -= total
    return out


def pinned_size(nbytes: int) -> int:
    """Bytes CUDA's caching host allocator reserves for a pinned request of `nbytes`: the next power of two."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


def staging_bytes(numels: list[int], pinned: bool, limit: int = CHUNK_BYTES, slab: int | None = None) -> int:
    """Host bytes of one group's staging (a gradient and a shard buffer per slab of chunks), rounded as the pinned
    allocator does when `pinned`."""
    chunks = [sum(numels[i] for i in chunk) * STAGING_DTYPE_BYTES for chunk in staging_chunks(numels, limit)]
    slabs = [sum(chunks[i] for i in group) for group in staging_slabs(chunks, slab)]
    return 2 * sum(pinned_size(n) if pinned else n for n in slabs)


MIN_SLOTS = 3  # optimizer_offload nvme: read-ahead, update, write-behind
NVME_ALIGN = 4096  # bytes: direct I/O needs file offsets, lengths and buffer addresses on the drive's blocks
IN_FLIGHT = 4  # optimizer_offload nvme: what a chunk holds in host memory, in fp32 copies of its parameters:
#                both moments, the gradients and the shards (nothing of the state stays in host memory)


def nvme_chunk_limit(buffer_bytes: int) -> int:
    """optimizer_offload nvme: fp32 bytes of parameters per chunk: CHUNK_BYTES, or less so that MIN_SLOTS chunks
    in flight (IN_FLIGHT copies each) fit parallel.offload_buffer_size; a power of two, so that a buffer's pinned
    staging (gradients and shards, 2 x the chunk) is not rounded up by CUDA's pinned allocator."""
    fit = max(STAGING_DTYPE_BYTES, buffer_bytes // (IN_FLIGHT * MIN_SLOTS))
    return min(CHUNK_BYTES, 1 << (fit.bit_length() - 1))


def nvme_slots(buffer_bytes: int, largest_chunk_numel: int, most_chunks: int) -> int:
    """optimizer_offload nvme: how many chunk buffers (both moments, gradients and shards each) stream the state:
    what the buffer size pays for, at least MIN_SLOTS, at most a group's number of chunks (the pipeline's
    length)."""
    per_slot = max(1, IN_FLIGHT * STAGING_DTYPE_BYTES * largest_chunk_numel)
    return min(max(MIN_SLOTS, buffer_bytes // per_slot), max(MIN_SLOTS, most_chunks))


def nvme_buffer_bytes(groups: list[list[int]], buffer_bytes: int, pinned: bool) -> int:
    """optimizer_offload nvme: host bytes of the stream's buffers for parameter groups of these local sizes, all
    the host memory the optimizer holds: per buffer both moments of the largest chunk rounded up to NVME_ALIGN
    and NVME_ALIGN more to align its address (train.optim_nvme.aligned_buffer), and its staging, one flat fp32
    buffer for the gradients and the shards of the largest chunk (pinned on CUDA, rounded as the allocator
    does)."""
    limit = nvme_chunk_limit(buffer_bytes)
    chunks = [[sum(numels[i] for i in c) for c in staging_chunks(numels, limit)] for numels in groups if numels]
    largest = max((n for group in chunks for n in group), default=0)
    if not largest:
        return 0
    slots = nvme_slots(buffer_bytes, largest, max((len(c) for c in chunks), default=0))
    span = -(-2 * STAGING_DTYPE_BYTES * largest // NVME_ALIGN) * NVME_ALIGN
    stage = 2 * STAGING_DTYPE_BYTES * largest
    return slots * (span + NVME_ALIGN + (pinned_size(stage) if pinned else stage))
