"""AdamW whose state and update live in CPU memory while parameters and gradients stay on the GPU.

The middle ground between no offload and FSDP2's CPUOffloadPolicy (which also
moves parameters and gradients, so every forward and backward all-gather starts
from host memory). Here each rank's local shards stay on the device for
compute; only the optimizer step moves: the local gradient shards are copied
to pinned host buffers, Adam's moments (8 bytes per parameter) are updated on
the CPU with torch's fused AdamW kernel, and the new fp32 parameter shards are
copied back. The host keeps its copy of each fp32 shard, so after the first
step only gradients travel down: per step 4 bytes per parameter each way, per
rank, for its shard only. The work goes in chunks of 64 MiB so copies overlap
the CPU update: all device-to-host copies are issued at once, each chunk is
updated as soon as its copies land, and its host-to-device copy runs while the
next chunk updates. GPU memory saved: the whole optimizer state.

Host staging: the chunks' gradients and parameter shards are views of a few
flat fp32 buffers, two per slab of consecutive chunks (`staging_chunks` and
`staging_slabs` fix the layout once per parameter group). CUDA's caching host
allocator rounds every pinned request up to a power of two, which per
parameter cost up to 2x the planned 8 bytes per parameter, and per chunk up to
2x again (Llama-3-70B on 2 x 8: 591 GiB of host per node where the bytes are
526); slabs of up to 1 GiB, each closed below a power of two, pay it once
each and by less than a chunk (527 GiB; train/staging.py, also what the
memory estimator counts).

The state is kept as DTensors with CPU local tensors and the parameters'
placements, so torch.distributed.checkpoint saves and reshards it exactly like
a regular AdamW's state. Loading puts it back on the CPU in fp32
(`load_state_dict`), whatever device and dtype the parameters have.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from itertools import chain
from typing import Any, Optional

import torch
from torch.distributed.tensor import DTensor
from torch.optim.adamw import adamw

from ..model.models import local_tensor
from . import staging


@dataclass
class StagingChunk:
    """One chunk of a parameter group in host memory: its parameters and their views into two flat buffers."""
    params: list[torch.Tensor]
    grads: list[torch.Tensor]  # views of one flat fp32 buffer, shaped like each parameter's local shard
    shards: list[torch.Tensor]  # the same for the parameter shards


def flat_views(flat: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    """Consecutive views of the 1-D tensor `flat`, one per shape, in order."""
    views, offset = [], 0
    for shape in shapes:
        n = shape.numel()
        views.append(flat[offset:offset + n].view(shape))
        offset += n
    return views


def build_staging(params: list[torch.Tensor], pin: bool, limit: int) -> list[StagingChunk]:
    """The host staging of one parameter group: per slab of chunks two flat fp32 buffers (pinned on CUDA), each
    chunk's parameters views of them (staging.staging_slabs)."""
    shapes = [local_tensor(p).shape for p in params]
    chunks = staging.staging_chunks([s.numel() for s in shapes], limit)  # positions in `params`
    sizes = [sum(shapes[i].numel() for i in chunk) for chunk in chunks]
    out = []
    for slab in staging.staging_slabs([staging.STAGING_DTYPE_BYTES * n for n in sizes]):
        flats = [torch.empty(sum(sizes[k] for k in slab), dtype=torch.float32, device="cpu", pin_memory=pin)
                 for _ in range(2)]
        at = 0
        for k in slab:
            mine = [shapes[i] for i in chunks[k]]
            views = [flat_views(flat[at:at + sizes[k]], mine) for flat in flats]
            out.append(StagingChunk([params[i] for i in chunks[k]], *views))
            at += sizes[k]
    return out


def like_param(local_cpu: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    if isinstance(param, DTensor):
        return DTensor.from_local(local_cpu, param.device_mesh, param.placements, run_check=False,
                                  shape=param.shape, stride=param.stride())
    return local_cpu


def host_state(value: Any, param: torch.Tensor, key: Any) -> Any:
    """A loaded AdamW state value as this optimizer keeps it: tensors in fp32 on the CPU (the moments shaped and
    placed like `param`), anything else unchanged."""
    if key == "step" and isinstance(value, (int, float)):  # older state dicts: a number
        return torch.tensor(float(value), dtype=torch.float32)
    if not isinstance(value, torch.Tensor):
        return value
    local = local_tensor(value).to("cpu", torch.float32)
    return local if key == "step" else like_param(local, param)


class CPUOffloadAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW semantics (decoupled weight decay, bias correction), state on the CPU."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self._pin = torch.cuda.is_available()
        self._limit = staging.CHUNK_BYTES  # fp32 bytes of parameters per staging chunk
        self._staging: dict[int, list[StagingChunk]] = {}  # parameter group index -> its host staging
        # fp32 shards whose device copy was last written by this optimizer from its host buffer: that buffer
        # already holds the shard, so the step skips the device -> host copy (half the PCIe traffic)
        self._in_sync: set[torch.Tensor] = set()
        self._keeps_shards = True  # the staging persists between steps (nvme's does not: it reads every shard)

    def load_state_dict(self, state_dict) -> None:
        """torch's load casts every state tensor to its parameter's device and dtype
        (Optimizer._process_value_according_to_param_policy): CUDA parameters would pull the offloaded moments
        onto the GPU (8 bytes per parameter, what offloading saves) and hand CUDA tensors to the CPU update;
        bf16 parameters would make them bf16. So torch loads the groups, and the state goes in here: fp32, CPU."""
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = dict(zip(saved_ids, chain.from_iterable(g["params"] for g in self.param_groups)))
        for key, st in state_dict["state"].items():
            p = params.get(key)
            if p is None:  # state of no parameter: kept as it is, as torch does
                self.state[key] = st
                continue
            self.state[p] = {k: host_state(v, p, k) for k, v in st.items()}
        self._in_sync.clear()  # a checkpoint load may have replaced the parameters too: read them again

    def staged(self, index: int) -> list[StagingChunk]:
        """Parameter group `index`'s host staging, made at its first step and kept (allocating and page-faulting
        fresh buffers every step cost more than the update)."""
        if index not in self._staging:
            self._staging[index] = build_staging(self.param_groups[index]["params"], self._pin, self._limit)
        return self._staging[index]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for index, group in enumerate(self.param_groups):
            # 1. device -> host: issue every chunk's gradient and parameter copies at once (async on CUDA),
            #    with an event per chunk, so the CPU can start on chunk 0 while later chunks are in flight
            staged = [s for s in (self._stage(chunk) for chunk in self.staged(index)) if s is not None]
            # 2. per chunk: wait for its copies, update on the CPU, send the new shards back asynchronously
            #    (the host -> device copy of chunk k overlaps the CPU update of chunk k + 1)
            for params, grads, host_params, event in staged:
                if event is not None:
                    event.synchronize()
                self._update(params, grads, host_params, group)
                self._send_back(params, host_params)
        return loss

    def _send_back(self, params: list[torch.Tensor], host_params: list[torch.Tensor]) -> None:
        """Copy a chunk's updated shards to the parameters (asynchronously on CUDA)."""
        for p, hp in zip(params, host_params):
            local_tensor(p).copy_(hp, non_blocking=self._pin)
            if self._keeps_shards and local_tensor(p).dtype == torch.float32:  # lower precision: re-read
                self._in_sync.add(p)

    def _stage(self, chunk: StagingChunk) -> Optional[tuple[list, list, list, Optional[torch.cuda.Event]]]:
        """Start the device -> host copies of the chunk's parameters that have a gradient."""
        live = [i for i, p in enumerate(chunk.params) if p.grad is not None]
        if not live:
            return None
        params = [chunk.params[i] for i in live]
        grads, host_params = [chunk.grads[i] for i in live], [chunk.shards[i] for i in live]
        return params, grads, host_params, copy_down(params, grads, host_params, self._pin, self._in_sync)

    def _update(self, params, grads, host_params, group) -> None:
        """The AdamW update of one chunk in host memory, with torch's fused CPU kernel: one pass over
        parameter, gradient and both moments (foreach ops make about ten passes; 6x slower, measured)."""
        m, v, steps = [], [], []
        for p in params:
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = like_param(torch.zeros(local_tensor(p).shape, dtype=torch.float32), p)
                st["exp_avg_sq"] = like_param(torch.zeros(local_tensor(p).shape, dtype=torch.float32), p)
            m.append(local_tensor(st["exp_avg"]))
            v.append(local_tensor(st["exp_avg_sq"]))
            steps.append(st["step"])
        adamw_update(host_params, grads, m, v, steps, group)


def copy_down(params: list[torch.Tensor], grads: list[torch.Tensor], host_params: list[torch.Tensor], pin: bool,
              in_sync: Collection[torch.Tensor] = ()) -> Optional[torch.cuda.Event]:
    """Start the device -> host copies of `params`' gradients and shards into their host buffers (asynchronous on
    CUDA; a shard in `in_sync` is on the host already); on CUDA the event the update waits for."""
    for p, g, hp in zip(params, grads, host_params):
        g.copy_(local_tensor(p.grad), non_blocking=pin)
        if p not in in_sync:
            hp.copy_(local_tensor(p), non_blocking=pin)
    if not pin:
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def adamw_update(host_params: list[torch.Tensor], grads: list[torch.Tensor], m: list[torch.Tensor],
                 v: list[torch.Tensor], steps: list[torch.Tensor], group: dict) -> None:
    """One AdamW update of host tensors in place, with torch's fused CPU kernel (elementwise per tensor: how the
    tensors are grouped into calls does not change a bit). Increments `steps` too."""
    (b1, b2) = group["betas"]
    adamw(host_params, grads, m, v, [], steps, fused=True, amsgrad=False, beta1=b1, beta2=b2, lr=group["lr"],
          weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
