"""Device-mesh layouts for `parallel.sharding`: full (1-D) or hybrid (2-D replicate x shard).

full:   one "dp" dimension over all ranks; every parameter is sharded over the
        whole world (ZeRO-3), so every all-gather and reduce-scatter crosses nodes.
hybrid: ranks are laid out as (replicate, shard). A shard group is one node
        (torchrun numbers ranks node by node, so a node's ranks are contiguous
        and form one row); parameters are sharded inside the node and
        replicated across nodes. All-gathers and reduce-scatters stay inside a
        node; across nodes only gradients are all-reduced (HSDP).
Both are pure data parallelism: every rank reads its own examples, and FSDP
averages gradients over all world_size ranks in either layout, so the
trainer's loss scaling (world_size / global target tokens) holds for both.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..config.schema import ParallelConfig
from .distributed import DistInfo, all_gather_rows, node_index
from ..core.errors import ConfigError, LaunchError


def hybrid_shape(world_size: int, shard_group_size: int) -> tuple[int, int]:
    """(replicate, shard) for a hybrid mesh; the shard group size must divide the world size."""
    if shard_group_size < 1 or world_size % shard_group_size:
        raise ConfigError(
            f"parallel.shard_group_size: {shard_group_size} does not divide the world size {world_size}; "
            "use a divisor (usually the number of processes per node) or null for one node per shard group"
        )
    return world_size // shard_group_size, shard_group_size


def check_node_layout(node_of_rank: list[int], shard_group_size: int) -> None:
    """Every shard group (a run of `shard_group_size` consecutive ranks) must be exactly one node."""
    for start in range(0, len(node_of_rank), shard_group_size):
        nodes = set(node_of_rank[start:start + shard_group_size])
        if len(nodes) != 1:
            raise LaunchError(
                f"parallel.sharding: hybrid: ranks {start}..{start + shard_group_size - 1} span nodes "
                f"{sorted(nodes)}; hybrid sharding needs the same number of processes on every node "
                "(set NPROC_PER_NODE alike everywhere) or an explicit parallel.shard_group_size"
            )
    per_node: dict[int, int] = {}
    for n in node_of_rank:
        per_node[n] = per_node.get(n, 0) + 1
    if len(set(per_node.values())) > 1:
        raise LaunchError(f"parallel.sharding: hybrid: nodes run different numbers of processes ({per_node}); "
                          "set NPROC_PER_NODE alike on every node")


def build_mesh(info: DistInfo, pcfg: ParallelConfig) -> DeviceMesh:
    """The mesh `fully_shard` gets: 1-D for full sharding, 2-D (replicate, shard) for hybrid."""
    if pcfg.sharding == "full":  # explicit device type: CPU meshes on gloo
        return init_device_mesh(info.device_type, (info.world_size,), mesh_dim_names=("dp",))
    group = pcfg.shard_group_size
    if group is None:  # one shard group per node, checked against where the ranks really run
        group = info.local_world_size
        node = node_index(info.rank, group)
        nodes = all_gather_rows(torch.tensor([node], dtype=torch.int64, device=info.device), info.world_size)
        check_node_layout(nodes.flatten().tolist(), group)
    shape = hybrid_shape(info.world_size, group)
    return init_device_mesh(info.device_type, shape, mesh_dim_names=("replicate", "shard"))


def describe(mesh: DeviceMesh) -> str:
    """e.g. 'dp 4' or 'replicate 2 x shard 2' (for the start-up log)."""
    names = mesh.mesh_dim_names or tuple(f"dim{i}" for i in range(mesh.ndim))
    return " x ".join(f"{n} {s}" for n, s in zip(names, mesh.shape))

