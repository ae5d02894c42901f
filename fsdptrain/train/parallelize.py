"""Apply FSDP2 (`fully_shard`), mixed precision, CPU offload and activation checkpointing.

Order matters: activation checkpointing is applied to each block first, then
compile (parallel.compile), then `fully_shard` on every block and finally on
the root (which then owns the embeddings, final norm and lm_head). Everything
here works on a model that still lives on the meta device.

Checkpointing is hook-based (torch's composable `checkpoint`), so module names
and state-dict keys stay Hugging Face's. A compiled block is the exception for
selective checkpointing: hooks run outside the compiled graph, where the
policy would see none of the compiled kernels' matmuls (inductor calls them as
`mm.out`, Triton kernels are not dispatched at all) and backward would
recompute the whole block. There the checkpoint goes inside the block's own
forward, which compile traces: the policy then marks the ops of the graph and
the partitioner keeps the matmul outputs (torchtitan's order: checkpoint,
compile, shard). Still no wrapper module: the keys do not change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from ..config.schema import ParallelConfig
from ..dist.plan import checkpoint_modes


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


# torch 2.13: in a selectively checkpointed block's recompute, FSDP's pre-forward hook runs inside the block's
# checkpoint context and opens a profiler range (record_function) that in forward it opened outside it (with
# bf16-mixed, or under any dispatch mode such as memory.phases' tracker); the replay then meets ops it never
# recorded and fails ("... encountered during backward but not found in storage"). They carry no tensors: the
# replay lets them through, as it does detach.
_PROFILER_OPS = {torch.ops.profiler._record_function_enter_new.default,
                 torch.ops.profiler._record_function_exit._RecordFunction}


def _selective_context():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_activation_checkpointing(blocks: list[nn.Module], modes: list[str], compiled: bool = False) -> None:
    """Non-reentrant checkpointing of whole blocks (full) or op-selective (selective), composable (no module
    wrapping, state-dict keys unchanged). Blocks can differ: each rank's plan may mix modes. compiled: the blocks
    will be compiled (parallel.compile): selective blocks checkpoint inside their forward (checkpoint_in_forward)."""
    from torch.distributed._composable import checkpoint
    from torch.utils.checkpoint import SAC_IGNORED_OPS

    if "selective" in modes and not compiled:
        SAC_IGNORED_OPS.update(_PROFILER_OPS)
    for block, mode in zip(blocks, modes):
        if mode == "selective" and compiled:
            checkpoint_in_forward(block, _selective_context)
        elif mode == "selective":
            checkpoint(block, context_fn=_selective_context)
        elif mode == "full":
            checkpoint(block)


def checkpoint_in_forward(block: nn.Module, context_fn) -> None:
    """Make the block's forward a non-reentrant checkpoint of itself, for torch.compile to trace: dynamo turns
    it into its checkpoint operator and the partitioner saves what `context_fn`'s policy keeps (selective
    checkpointing under torch.compile). FSDP's hooks stay around it, outside the compiled graph."""
    import torch._dynamo
    from torch.utils.checkpoint import checkpoint

    # Python-side effects in a block's forward (transformers' hub-kernel bookkeeping around attention, the MoE
    # expert-load counter) would otherwise break the graph at the checkpoint, and the block would run eagerly. They
    # must happen once per forward, not again in the recomputation, which is what this setting does.
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    inner = block.forward  # the model class's own forward, bound to this block

    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

    block.forward = forward


def set_prefetch(blocks: list[nn.Module], n: int) -> None:
    """All-gather the next n blocks ahead in forward, and the previous n in backward."""
    if n <= 0:
        return
    for i, block in enumerate(blocks):
        block.set_modules_to_forward_prefetch(blocks[i + 1:i + 1 + n])
        block.set_modules_to_backward_prefetch(list(reversed(blocks[max(0, i - n):i])))


def apply_fsdp(model: nn.Module, blocks: list[nn.Module], mesh: DeviceMesh, pcfg: ParallelConfig,
               precision: str, modes: list[str] | None = None) -> ParallelPlan:
    """precision: resolved (plan.resolve_precision). modes: per-block checkpointing (from
    memory.estimate.plan_auto_checkpointing with activation_checkpointing auto); default: the configured mode.
    The caller has checked the options against the device (plan.check_device_support) before any work."""
    if modes is None:
        modes = checkpoint_modes(len(blocks), pcfg.activation_checkpointing, pcfg.activation_checkpointing_k)
    apply_activation_checkpointing(blocks, modes, compiled=pcfg.compile)
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
