"""parallel.optimizer_offload: nvme: CPUOffloadAdamW with AdamW's moments in a file instead of host memory.

The update is the in-memory offload's (train/optim_offload.py): the same chunks of gradients and fp32 shards
copied to the host, the same fused CPU AdamW per chunk, the same copies back; only where the moments live
changes, so losses and parameters are bitwise those of `optimizer_offload: true`. Nor does any staging persist
between steps: a chunk's gradients and shards pass through its stream buffer (each step copies the shards down
again, 4 more bytes per parameter over PCIe than the in-memory offload, which keeps them), so the host holds
only the buffers, whatever the model's size.

The file: one per rank, `moments.bin` in the rank's marked scratch subfolder (train/offload_dir.py). Each
staging chunk (consecutive parameters of one group, at most `staging.nvme_chunk_limit` bytes of fp32) owns one
region: the exp_avg of its parameters, then their exp_avg_sq, rounded up to 4 KiB, so a chunk is one read and one
write, aligned for direct I/O (O_DIRECT: no copy through the page cache, and a state larger than memory does not
churn it), which the stream uses where the file system allows it. The file is allocated in full at the start
(posix_fallocate: reads as zeros, and a disk that fills up later cannot fail a moments write), after a free-space
check with the numbers.

A step streams the regions through `slots` host buffers (parallel.offload_buffer_size): a reader thread reads chunk
k + slots - 2 ahead while the CPU updates chunk k, and a writer thread writes chunk k back while chunk k + 1
updates; a buffer is reused only once its write has finished. The stream also runs across the step boundary, in the
same buffers: the step returns with its last chunks' writes still running, and reads the next step's first chunks
(one per buffer, each once its buffer's write is done) while forward and backward run, so that the next step starts
with full buffers. A buffer's staging (the chunk's gradients and shards, pinned on CUDA) is filled when its moments
are read, by device -> host copies issued on the current stream after the host -> device copies of the chunk it held
before: the stream's order, not a wait, keeps them apart. Whatever reads the file waits for the writes (`settle`:
the state dict, the page-cache eviction); a load drops the reads ahead. The threads do plain pread/pwrite, which
release the GIL, as does the fused update. Host memory: slots x 4 x the largest chunk (staging.nvme_buffer_bytes).

Checkpoints: `state_dict()` hands torch.distributed.checkpoint the moments as views of a shared memory map of the
file (DTensors placed like the parameters, as the in-memory offload's), so DCP saves them chunk by chunk from
the file, and a DCP load writes straight into the file through the same views; `load_state_dict` copies
whatever else it is given (a state dict of the in-memory offload, one built by hand) into the file. The
mapping's pages are the kernel's page cache, dropped from this process after every load and before every step
(so that no page is mapped while direct I/O writes the file; the kernel writes dirty pages back before a direct
read of them).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..core.units import format_bytes
from ..model.models import local_tensor
from . import staging
from .offload_dir import OffloadDirError, Scratch, check_space, free_bytes
from .optim_offload import CPUOffloadAdamW, adamw_update, copy_down, flat_views, like_param

MOMENTS_FILE = "moments.bin"
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
FP32 = 4
ALIGN = staging.NVME_ALIGN


@dataclass
class Region:
    """One staging chunk's place in the file: its first element, its parameters' sizes and shapes."""
    start: int  # in fp32 elements from the file's start: exp_avg of the chunk's parameters, then exp_avg_sq
    shapes: list[torch.Size]

    @property
    def numel(self) -> int:
        return sum(s.numel() for s in self.shapes)

    @property
    def span(self) -> int:
        """fp32 elements the region takes in the file and in a buffer: both moments, rounded up to ALIGN."""
        per_block = ALIGN // FP32
        return -(-2 * self.numel // per_block) * per_block


@dataclass
class IOStats:
    """What the file I/O cost since the optimizer was made (benchmarks/nvme_offload.py reports it)."""
    read_bytes: int = 0
    written_bytes: int = 0
    io_seconds: float = 0.0  # the I/O threads' time in pread / pwrite
    wait_seconds: float = 0.0  # the update's time waiting for them: the I/O not hidden behind the update

    @property
    def hidden_share(self) -> float:
        """The share of the I/O time that ran while the CPU updated."""
        return 1.0 - min(self.wait_seconds, self.io_seconds) / self.io_seconds if self.io_seconds else 1.0


def read_into(fd: int, buf: torch.Tensor, offset: int) -> None:
    """Fill the contiguous CPU tensor `buf` from the file at byte `offset`."""
    view = memoryview(buf.numpy()).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError(errno.EIO, "the file is shorter than the optimizer state")
        done += n


def write_from(fd: int, buf: torch.Tensor, offset: int) -> None:
    """Write the contiguous CPU tensor `buf` to the file at byte `offset`."""
    view = memoryview(buf.numpy()).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def allocate(path: Path, nbytes: int, local_world: int) -> int:
    """Create the moments file of `nbytes` (zeros, blocks reserved where the file system can) after checking the
    free space; returns its descriptor."""
    check_space(path.parent.parent, nbytes, local_world, free=free_bytes(path.parent))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if nbytes:
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.ftruncate(fd, nbytes)  # no reservation on this file system: a sparse file of zeros
    except OSError as e:
        os.close(fd)
        raise OffloadDirError(f"parallel.offload_dir: cannot allocate {format_bytes(nbytes)} for the optimizer "
                              f"state in {path.parent} ({e.strerror}); free space there, or give a larger "
                              "drive") from None
    return fd


def open_direct(path: Path) -> Optional[int]:
    """A descriptor of `path` for direct I/O (O_DIRECT), or None where the file system refuses it."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, os.O_RDWR | os.O_DIRECT)
    except OSError:
        return None


def aligned_buffer(numel: int) -> torch.Tensor:
    """A zeroed fp32 CPU tensor of `numel` elements whose address is a multiple of ALIGN (direct I/O's rule)."""
    raw = torch.zeros(numel + ALIGN // FP32, dtype=torch.float32)
    skip = (-raw.data_ptr() % ALIGN) // FP32
    return raw[skip:skip + numel]


class NVMeOffloadAdamW(CPUOffloadAdamW):
    """CPUOffloadAdamW whose moments stream from a file in the rank's scratch folder (module docstring)."""

    def __init__(self, params, scratch: Scratch, buffer_bytes: int, local_world: int = 1, **hyper):
        super().__init__(params, **hyper)
        self._keeps_shards = False  # no staging between steps: every step copies the shards down
        self._scratch = scratch
        self._limit = staging.nvme_chunk_limit(buffer_bytes)
        self._chunks = [self._layout(group["params"]) for group in self.param_groups]  # per group: chunks
        self._regions = self._plan()
        total = sum(r.span for regions in self._regions for r in regions)
        self._largest = max((r.numel for regions in self._regions for r in regions), default=0)
        self.slots = staging.nvme_slots(buffer_bytes, self._largest, max((len(r) for r in self._regions), default=0))
        self._slot_numel = max((r.span for regions in self._regions for r in regions), default=0)
        self._buffers: list[torch.Tensor] = []  # per slot: a chunk's moments (made at the first step)
        self._staging_buffers: list[torch.Tensor] = []  # per slot: its gradients, then its shards (likewise)
        self._writes: dict[int, Future] = {}  # buffer -> its chunk's write, possibly still running
        self._prefetched: dict[int, tuple[int, int, Future]] = {}  # buffer -> (group, chunk, read) for next step
        self.across_steps = True  # False: each step waits for its own writes and reads nothing ahead (benchmarks)
        self.path = scratch.folder / MOMENTS_FILE
        self.nbytes = FP32 * total
        self._fd: Optional[int] = allocate(self.path, self.nbytes, local_world)
        # the stream bypasses the page cache where the file system allows (no copy through the kernel, and a
        # state larger than memory does not churn the cache); elsewhere (tmpfs) it reads and writes through it
        self._direct_fd = open_direct(self.path)
        self.direct = self._direct_fd is not None
        self._map = mmap.mmap(self._fd, self.nbytes) if self.nbytes else None
        self._flat = torch.frombuffer(self._map, dtype=torch.float32) if self._map is not None else None
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="fsdptrain-nvme-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="fsdptrain-nvme-write")
        self.stats = IOStats()
        self._stats_lock = threading.Lock()
        self._where = {p: (index, k, i) for index, chunks in enumerate(self._chunks)
                       for k, chunk in enumerate(chunks) for i, p in enumerate(chunk)}

    def _layout(self, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """A group's parameters in chunks of at most self._limit bytes of fp32 (the in-memory staging's rule)."""
        numels = [local_tensor(p).numel() for p in params]
        return [[params[i] for i in chunk] for chunk in staging.staging_chunks(numels, self._limit)]

    def _plan(self) -> list[list[Region]]:
        """Every group's chunks laid end to end in the file."""
        out, start = [], 0
        for chunks in self._chunks:
            regions = []
            for chunk in chunks:
                regions.append(Region(start, [local_tensor(p).shape for p in chunk]))
                start += regions[-1].span
            out.append(regions)
        return out

    # -- the file's contents as tensors ---------------------------------------------------------------

    def _file_views(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p's exp_avg and exp_avg_sq as views of the memory map (shaped like p's local shard)."""
        index, k, i = self._where[p]
        region = self._regions[index][k]
        shape = region.shapes[i]
        first = region.start + sum(s.numel() for s in region.shapes[:i])  # exp_avg; exp_avg_sq one chunk later
        return tuple(self._flat[at:at + shape.numel()].view(shape) for at in (first, first + region.numel))

    def _drop_mapped_pages(self) -> None:
        """Unmap the touched pages from this process (they stay in the file and the page cache): a save or load
        through the map would otherwise count the whole state in the process's resident memory."""
        if self._map is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)

    def state_dict(self) -> dict:
        """torch's state dict with the moments of every parameter that has state, as views of the file (once the
        writes still running have finished)."""
        self.settle()
        sd = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [i for g in sd["param_groups"] for i in g["params"]]
        by_id = dict(zip(ids, params))
        state = {}
        for key, st in sd["state"].items():
            p = by_id.get(key)
            if p is None or p not in self._where or "step" not in st:
                state[key] = st
                continue
            m, v = self._file_views(p)
            state[key] = {**st, "exp_avg": like_param(m, p), "exp_avg_sq": like_param(v, p)}
        return {**sd, "state": state}

    def load_state_dict(self, state_dict) -> None:
        """CPUOffloadAdamW's load, then the moments into the file (unless a DCP load already wrote them there
        through the views state_dict gave it); parameters without state get zeros, as a fresh start has. The
        reads ahead hold the old state: dropped."""
        self.settle(drop_reads=True)
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for p in self._where:
                st = self.state.get(p)
                views = self._file_views(p)
                if not st or not all(k in st for k in MOMENT_KEYS):
                    for view in views:
                        view.zero_()
                    if st:
                        self.state[p] = {k: v for k, v in st.items() if k not in MOMENT_KEYS}
                    continue
                for key, view in zip(MOMENT_KEYS, views):
                    value = local_tensor(st[key])
                    if value.data_ptr() != view.data_ptr():
                        view.copy_(value)
                self.state[p] = {k: v for k, v in st.items() if k not in MOMENT_KEYS}
        self._drop_mapped_pages()

    # -- the step ---------------------------------------------------------------------------------------

    def _slots(self) -> list[torch.Tensor]:
        if not self._buffers:
            self._buffers = [aligned_buffer(self._slot_numel) for _ in range(self.slots)]
            self._staging_buffers = [torch.empty(2 * self._largest, dtype=torch.float32, pin_memory=self._pin)
                                     for _ in range(self.slots)]
        return self._buffers

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self._drop_mapped_pages()  # a checkpoint save since the last step read the state through the map
        for index, group in enumerate(self.param_groups):
            live = ((k, [p for p in chunk if p.grad is not None]) for k, chunk in enumerate(self._chunks[index]))
            self._stream(index, group, [(k, params) for k, params in live if params])
        if self.across_steps:
            self._prefetch()
        else:
            self.settle()
        return loss

    def _io(self, index: int, k: int, slot: int) -> tuple[torch.Tensor, int]:
        """Group `index`'s chunk k in buffer `slot`: the buffer's view of its region's span, the byte offset."""
        region = self._regions[index][k]
        return self._slots()[slot][:region.span], FP32 * region.start

    def _stage_slot(self, slot: int, params: list[torch.Tensor]) -> tuple[list, list, list, Optional[torch.cuda.Event]]:
        """Start the device -> host copies of the gradients and shards of `params` (a chunk's, those with a
        gradient) into buffer `slot`'s staging; on CUDA with an event the update waits for. Called from the step's
        own thread: its copies and the copies back go to the same current stream, whose order keeps a buffer's
        next chunk from overwriting what its last chunk still sends back."""
        shapes = [local_tensor(p).shape for p in params]
        n = sum(s.numel() for s in shapes)
        flat = self._staging_buffers[slot]
        grads, host_params = flat_views(flat[:n], shapes), flat_views(flat[self._largest:self._largest + n], shapes)
        return params, grads, host_params, copy_down(params, grads, host_params, self._pin)

    def _stream(self, index: int, group: dict, todo: list[tuple[int, list[torch.Tensor]]]) -> None:
        """Update group `index`'s chunks in `todo` ((chunk, its parameters with a gradient)), streaming their
        moments, gradients and shards (module docstring). The chunk at position j uses buffer j % slots; the last
        chunks' writes are left running when it returns (the next read into their buffers, `settle` or `close`
        waits for them)."""
        n = len(self._slots())
        reads: dict[int, Future] = {}
        staged: dict[int, tuple] = {}

        def read(j: int) -> None:
            slot, k = j % n, todo[j][0]
            # the buffer's staging: its last chunk's copies back were issued before these, on the same stream
            staged[j] = self._stage_slot(slot, todo[j][1])
            write = self._writes.pop(slot, None)  # the buffer's previous chunk must be on the file first
            if write is not None:
                self._wait(write, "write")
            ahead = self._prefetched.pop(slot, None)
            if ahead is not None and ahead[:2] == (index, k):
                reads[j] = ahead[2]  # read at the end of the last step, while forward and backward ran
                return
            if ahead is not None:  # read ahead for a chunk this step does not update (no gradients): not used
                ahead[2].exception()
            reads[j] = self._reader.submit(self._timed, read_into, *self._io(index, k, slot))

        for j in range(min(n - 1, len(todo))):
            read(j)
        try:
            for j, (k, _) in enumerate(todo):
                self._wait(reads.pop(j), "read")
                params, grads, host_params, event = staged.pop(j)
                if event is not None:
                    event.synchronize()
                buf, offset = self._io(index, k, j % n)
                self._update_chunk(self._regions[index][k], buf, params, grads, host_params, group)
                self._send_back(params, host_params)
                self._writes[j % n] = self._writer.submit(self._timed, write_from, buf, offset)
                if j + n - 1 < len(todo):
                    read(j + n - 1)  # into the buffer of chunk j - 1, once its write is done
        finally:
            for fut in reads.values():  # a failure: let the reader finish with the buffers
                fut.exception()

    def _prefetch(self) -> None:
        """Start reading the first chunks of the next step into the buffers (all of them, a chunk each), so that
        they load while forward and backward run; each read waits in the reader thread for its buffer's write.
        The next step uses a read only if it updates that chunk in that buffer; loading a state drops them."""
        index = next((i for i, regions in enumerate(self._regions) if regions), None)
        if index is None:
            return
        for slot in range(min(len(self._slots()), len(self._regions[index]))):
            write = self._writes.get(slot)
            self._prefetched[slot] = (index, slot, self._reader.submit(self._read_after, write,
                                                                       *self._io(index, slot, slot)))

    def _read_after(self, write: Optional[Future], buf: torch.Tensor, offset: int) -> None:
        """In the reader thread: fill `buf` from the file once the buffer's previous write is done."""
        if write is not None:
            write.exception()  # its failure, if any, is said where the step waits for the write itself
        self._timed(read_into, buf, offset)

    def settle(self, drop_reads: bool = False) -> None:
        """Wait for the I/O still running: the writes (the file then holds the state) and the reads ahead, which
        `drop_reads` drops (the file is about to change)."""
        for slot in sorted(self._writes):
            self._wait(self._writes.pop(slot), "write")
        for *_, fut in self._prefetched.values():
            fut.exception()  # a failed read is said where a step waits for it
        if drop_reads:
            self._prefetched.clear()

    def _update_chunk(self, region: Region, slot: torch.Tensor, params: list, grads: list, host_params: list,
                      group: dict) -> None:
        """The in-memory offload's update, with the moments taken from the chunk's slot."""
        n = region.numel
        m_all, v_all = flat_views(slot[:n], region.shapes), flat_views(slot[n:], region.shapes)
        m, v, steps = [], [], []
        for p in params:
            i = self._where[p][2]
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
            m.append(m_all[i])
            v.append(v_all[i])
            steps.append(st["step"])
        adamw_update(host_params, grads, m, v, steps, group)

    def _timed(self, fn, buf: torch.Tensor, offset: int) -> None:
        """fn(fd, buf, offset) in an I/O thread, counted in self.stats."""
        t0 = time.perf_counter()
        fn(self._direct_fd if self._direct_fd is not None else self._fd, buf, offset)
        dt = time.perf_counter() - t0
        with self._stats_lock:
            self.stats.io_seconds += dt
            if fn is read_into:
                self.stats.read_bytes += buf.nbytes
            else:
                self.stats.written_bytes += buf.nbytes

    def _wait(self, fut: Future, what: str) -> None:
        t0 = time.perf_counter()
        try:
            fut.result()
        except OSError as e:
            free = free_bytes(self.path.parent)
            left = f"; {format_bytes(free)} free there" if free is not None else ""
            raise OffloadDirError(f"parallel.offload_dir: could not {what} the optimizer state in {self.path} "
                                  f"({e.strerror or e}{left}); the run stops without saving, its earlier "
                                  "checkpoints are intact: fix the drive and rerun the same command to continue "
                                  "from the newest") from None
        finally:
            self.stats.wait_seconds += time.perf_counter() - t0

    def evict_page_cache(self) -> None:
        """Write the file back and drop its pages from the page cache, so that the next step reads from the drive
        (benchmarks: a state larger than the page cache, as a 70B model's is)."""
        if self._fd is not None and hasattr(os, "posix_fadvise"):
            self.settle(drop_reads=True)
            os.fsync(self._fd)
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if self._buffers and self.across_steps:  # read ahead again, from the drive
                self._prefetch()

    def close(self) -> None:
        """Stop the I/O threads and delete the rank's scratch subfolder (the file with it)."""
        for fut in (*self._writes.values(), *(f for *_, f in self._prefetched.values())):
            fut.exception()  # the state is discarded: a failure no longer matters
        self._writes.clear()
        self._prefetched.clear()
        self._reader.shutdown(wait=True)
        self._writer.shutdown(wait=True)
        self._buffers = []
        self._staging_buffers = []
        self._flat = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a tensor still views the map (a state dict kept by a caller): unmapped with it
                pass
            self._map = None
        for fd in (self._direct_fd, self._fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._direct_fd = None
        self._scratch.close()
