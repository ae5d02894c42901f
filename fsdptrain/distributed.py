"""Process group, device and mesh set-up from the torchrun environment; rank helpers.

`python -m fsdptrain train` without torchrun runs as a one-process group (so the
loop is the same code path at every scale). Under torchrun we read RANK,
LOCAL_RANK, WORLD_SIZE (and LOCAL_WORLD_SIZE) and rendezvous through
MASTER_ADDR/MASTER_PORT via the env:// method. CUDA + NCCL when GPUs exist,
otherwise CPU + gloo with an explicit CPU device mesh (on a GPU machine the
default mesh would pick CUDA).
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .elastic import fresh_store
from .errors import LaunchError


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str
    owns_group: bool  # we created the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_type(self) -> str:
        return self.device.type


def _env_int(name: str, default: Optional[int] = None) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        if default is None:
            raise LaunchError(f"environment variable {name} is not set; launch with torchrun or unset WORLD_SIZE")
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device_type(requested: str) -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        raise LaunchError("parallel.device: cuda was requested but no CUDA device is visible; use parallel.device=cpu or auto")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def init(device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Join (or create) the default process group and pick this rank's device."""
    device_type = resolve_device_type(device)
    backend = "nccl" if device_type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)

    if dist.is_initialized():  # e.g. several runs in one launched test process
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", 0)
        local_world = _env_int("LOCAL_WORLD_SIZE", world)
        owns = False
    elif "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
        local_rank = _env_int("LOCAL_RANK", 0)
        local_world = _env_int("LOCAL_WORLD_SIZE", world)
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise LaunchError(f"{name} is not set; torchrun sets it (use torchrun, or export {name})")
        if device_type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise LaunchError(
                    f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices are visible; "
                    "lower --nproc-per-node or check CUDA_VISIBLE_DEVICES"
                )
            torch.cuda.set_device(local_rank)
        try:
            store = fresh_store(rank, world, timeout)  # None unless torchrun's agent store (stale keys after a restart)
            dist.init_process_group(
                backend=backend,
                init_method=None if store is not None else "env://",
                store=store,
                rank=rank,
                world_size=world,
                timeout=timeout,
                device_id=torch.device("cuda", local_rank) if device_type == "cuda" else None,
            )
        except Exception as e:  # rendezvous failures: say where we tried to go
            raise LaunchError(
                f"could not join the process group at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
                f"as rank {rank}/{world} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "check MASTER_ADDR/MASTER_PORT, the network interface and that every node started"
            ) from None
        owns = True
        # One line per rank, so each node's log shows which ranks it runs (multi-node debugging).
        print(f"fsdptrain: rank {rank}/{world} (local rank {local_rank}/{local_world}, node "
              f"{os.environ.get('GROUP_RANK', '?')}) on host {socket.gethostname()} joined "
              f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", flush=True)
    else:  # plain `python -m fsdptrain train`: a one-process group, no network
        rank, world, local_rank, local_world = 0, 1, 0, 1
        if device_type == "cuda":
            torch.cuda.set_device(0)
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        owns = True

    dev = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    return DistInfo(rank, local_rank, world, local_world, dev, backend, owns)


def build_mesh(info: DistInfo) -> DeviceMesh:
    """1-D data-parallel mesh over all ranks (explicit device type: CPU meshes on gloo)."""
    return init_device_mesh(info.device_type, (info.world_size,), mesh_dim_names=("dp",))


def shutdown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def all_gather_rows(t: torch.Tensor, world_size: int) -> torch.Tensor:
    """Stack one small 1-D tensor from every rank into (world_size, n)."""
    out = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(out, t)
    return torch.stack(out)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
