"""Apply FSDP2 (`fully_shard`), mixed precision, CPU offload and activation checkpointing.

Order matters: activation checkpointing is applied to each block first, then
`fully_shard` on every block and finally on the root (which then owns the
embeddings, final norm and lm_head). Everything here works on a model that
still lives on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from . import distributed
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
    checkpoint_modes: list[str]  # per block: none | selective | full
    precision: str
    offload: bool

    @property
    def checkpointed(self) -> list[int]:
        return [i for i, m in enumerate(self.checkpoint_modes) if m != "none"]


def checkpoint_modes(n_blocks: int, mode: str, k: int) -> list[str]:
    """Per-block checkpointing for a configured mode (auto is planned from a memory budget, not here)."""
    if mode == "every_k":
        return ["full" if i % k == 0 else "none" for i in range(n_blocks)]
    if mode in ("none", "full", "selective"):
        return [mode] * n_blocks
    raise ValueError(f"checkpointing mode {mode!r} has no fixed plan")


def describe_modes(modes: list[str]) -> str:
    """['selective', 'selective', 'full'] -> 'blocks 0-1 selective, 2 full'."""
    runs: list[list] = []
    for i, m in enumerate(modes):
        if runs and runs[-1][2] == m:
            runs[-1][1] = i
        else:
            runs.append([i, i, m])
    return "blocks " + ", ".join(f"{a}-{b} {m}" if a != b else f"{a} {m}" for a, b, m in runs)


# Ops whose outputs selective checkpointing keeps: the expensive ones. Everything else (norms, activations,
# RoPE, residual adds) is recomputed in backward, which costs little time and frees most activation memory
# that is not a matmul output.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_mm.default,
}


def _selective_context():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_activation_checkpointing(blocks: list[nn.Module], modes: list[str]) -> None:
    """Non-reentrant checkpointing of whole blocks (full) or op-selective (selective), composable (no module
    wrapping, state-dict keys unchanged). Blocks can differ: each rank's plan may mix modes."""
    from torch.distributed._composable import checkpoint

    for block, mode in zip(blocks, modes):
        if mode == "selective":
            checkpoint(block, context_fn=_selective_context)
        elif mode == "full":
            checkpoint(block)


def set_prefetch(blocks: list[nn.Module], n: int) -> None:
    """All-gather the next n blocks ahead in forward, and the previous n in backward."""
    if n <= 0:
        return
    for i, block in enumerate(blocks):
        block.set_modules_to_forward_prefetch(blocks[i + 1:i + 1 + n])
        block.set_modules_to_backward_prefetch(list(reversed(blocks[max(0, i - n):i])))


def check_device_support(pcfg: ParallelConfig, device_type: str) -> None:
    """Fail before any work is done when the options cannot run on this device."""
    if pcfg.cpu_offload and device_type != "cuda":
        raise ConfigError(
            "parallel.cpu_offload: true needs CUDA GPUs (FSDP2 offload pins host memory for GPU copies); "
            "this run is on CPU, so set parallel.cpu_offload=false"
        )
    if pcfg.activation_checkpointing == "auto" and device_type != "cuda" and pcfg.memory_budget_gib <= 0:
        raise ConfigError("parallel.memory_budget_gib: activation_checkpointing=auto on CPU needs a budget; "
                          "set parallel.memory_budget_gib (GiB) or choose another activation_checkpointing")


def plan_auto_checkpointing(cfg, model: nn.Module, world_size: int, local_world_size: int,
                            device: torch.device) -> tuple[list[str], str]:
    """activation_checkpointing auto: the least recomputation whose estimated peak fits the budget (the
    configured one, or the smallest GPU's memory across ranks). Returns the per-block modes and a log line."""
    from .memory import estimate

    gpu_memory = 0
    if device.type == "cuda":
        total = torch.tensor([torch.cuda.get_device_properties(device).total_memory], dtype=torch.float64,
                             device=device)
        gpu_memory = int(distributed.all_reduce_min(total).item())  # mixed GPU types: plan for the smallest
    budget = estimate.budget_bytes(cfg.parallel.memory_budget_gib, gpu_memory)
    nnodes = max(1, world_size // max(1, local_world_size))
    settings = estimate.settings_from_config(cfg, nnodes, world_size // nnodes, gpu_memory or budget,
                                             device_type=device.type)
    modes, est = estimate.plan_checkpointing(estimate.shape_of_model(model), settings, budget)
    verdict = "fits" if est.peak <= budget else "does NOT fit even with every block full; see `fsdptrain estimate`"
    return modes, (f"activation checkpointing auto: {describe_modes(modes)}; estimated peak "
                   f"{estimate.gib(est.peak)} for a budget of {estimate.gib(budget)} ({verdict})")


def apply_fsdp(model: nn.Module, blocks: list[nn.Module], mesh: DeviceMesh, pcfg: ParallelConfig,
               device_type: str, modes: Optional[list[str]] = None) -> ParallelPlan:
    """modes: per-block checkpointing (from memory.estimate.plan_checkpointing with activation_checkpointing
    auto); default: the configured mode."""
    check_device_support(pcfg, device_type)
    precision = resolve_precision(pcfg.precision, device_type)
    if modes is None:
        modes = checkpoint_modes(len(blocks), pcfg.activation_checkpointing, pcfg.activation_checkpointing_k)
    apply_activation_checkpointing(blocks, modes)
    if pcfg.compile:
        for block in blocks:  # after checkpointing, before sharding: FSDP's hooks stay outside the graph
            block.compile(backend=pcfg.compile_backend)

    kwargs = {"mesh": mesh, "mp_policy": mixed_precision_policy(precision)}
    if pcfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
    for i, block in enumerate(blocks):
        # The last block's weights are needed again at once by backward: never free them after forward.
        reshard = pcfg.reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, reshard_after_forward=reshard, **kwargs)
    fully_shard(model, reshard_after_forward=pcfg.reshard_after_forward, **kwargs)
    set_prefetch(blocks, pcfg.prefetch_blocks)
    return ParallelPlan(n_blocks=len(blocks), checkpoint_modes=modes, precision=precision, offload=pcfg.cpu_offload)
