"""Apply FSDP2 (`fully_shard`), mixed precision, CPU offload and activation checkpointing.

Order matters: activation checkpointing is applied to each block first, then
`fully_shard` on every block and finally on the root (which then owns the
embeddings, final norm and lm_head). Everything here works on a model that
still lives on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from .config import ParallelConfig
from .errors import ConfigError


def resolve_precision(precision: str, device_type: str) -> str:
    if precision == "auto":
        return "bf16-mixed" if device_type == "cuda" else "fp32"
    return precision


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    if precision == "bf16-mixed":  # bf16 compute and all-gather, fp32 master weights and gradient reduction
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision == "bf16-pure":  # params already bf16; reduce in fp32 for accuracy of the sum
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


@dataclass
class ParallelPlan:
    """What was applied, for logs and tests."""
    n_blocks: int
    checkpointed: list[int]
    precision: str
    offload: bool


def checkpointed_indices(n_blocks: int, mode: str, k: int) -> list[int]:
    if mode == "none":
        return []
    if mode == "full":
        return list(range(n_blocks))
    return [i for i in range(n_blocks) if i % k == 0]


def apply_activation_checkpointing(blocks: list[nn.Module], indices: list[int]) -> None:
    """Non-reentrant checkpointing of whole blocks, composable (no module wrapping, state-dict keys unchanged)."""
    from torch.distributed._composable import checkpoint

    for i in indices:
        checkpoint(blocks[i])


def check_device_support(pcfg: ParallelConfig, device_type: str) -> None:
    """Fail before any work is done when the options cannot run on this device."""
    if pcfg.cpu_offload and device_type != "cuda":
        raise ConfigError(
            "parallel.cpu_offload: true needs CUDA GPUs (FSDP2 offload pins host memory for GPU copies); "
            "this run is on CPU, so set parallel.cpu_offload=false"
        )


def apply_fsdp(model: nn.Module, blocks: list[nn.Module], mesh: DeviceMesh, pcfg: ParallelConfig,
               device_type: str) -> ParallelPlan:
    check_device_support(pcfg, device_type)
    precision = resolve_precision(pcfg.precision, device_type)
    ac = checkpointed_indices(len(blocks), pcfg.activation_checkpointing, pcfg.activation_checkpointing_k)
    apply_activation_checkpointing(blocks, ac)

    kwargs = {"mesh": mesh, "mp_policy": mixed_precision_policy(precision)}
    if pcfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
    for i, block in enumerate(blocks):
        # The last block's weights are needed again at once by backward: never free them after forward.
        reshard = pcfg.reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, reshard_after_forward=reshard, **kwargs)
    fully_shard(model, reshard_after_forward=pcfg.reshard_after_forward, **kwargs)
    return ParallelPlan(n_blocks=len(blocks), checkpointed=ac, precision=precision, offload=pcfg.cpu_offload)
