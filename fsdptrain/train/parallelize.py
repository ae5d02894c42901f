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


def mixed_precision_policy(precision: str, reduce_dtype: str = "fp32") -> MixedPrecisionPolicy:
    """bf16-mixed: bf16 compute and all-gather, fp32 master weights; bf16-pure: parameters already bf16. Both
    reduce gradients in fp32 for the accuracy of the sum unless parallel.reduce_dtype is bf16 (half the traffic).
    fp32: no casts (plan.check_device_support refuses a bf16 reduction there)."""
    if precision in ("bf16-mixed", "bf16-pure"):
        reduce = torch.bfloat16 if reduce_dtype == "bf16" else torch.float32
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce)
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


RECOMPILE_LIMIT = 32  # compiled variants dynamo keeps per code object before it runs that code eagerly


def compile_blocks(blocks: list[nn.Module], backend: str) -> None:
    """torch.compile each block, after checkpointing and before sharding (FSDP's hooks stay outside the graph).
    All blocks share one compiled forward, and its guard variants multiply: train and eval (no_grad), packed
    (4-D mask) or not, static then dynamic sequence length, a batch of one, MoE counting on or off. Past dynamo's
    default of 8 recompiles a block would silently run eagerly for the rest of the run: the limit goes to 32."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in blocks:
        block.compile(backend=backend)


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
        compile_blocks(blocks, pcfg.compile_backend)

    kwargs = {"mesh": mesh, "mp_policy": mixed_precision_policy(precision, pcfg.reduce_dtype)}
    if pcfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
    for i, block in enumerate(blocks):
        # The last block's weights are needed again at once by backward: never free them after forward.
        reshard = pcfg.reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, reshard_after_forward=reshard, **kwargs)
    fully_shard(model, reshard_after_forward=pcfg.reshard_after_forward, **kwargs)
    set_prefetch(blocks, pcfg.prefetch_blocks)
    return ParallelPlan(n_blocks=len(blocks), checkpoint_modes=modes, precision=precision, offload=pcfg.cpu_offload)


def after_no_grad_forward(model: nn.Module) -> None:
    """Tidy FSDP2's per-iteration records after a forward under no_grad that no backward follows (a preference
    run's reference forward): free every unit's gathered weights (a unit that keeps them after forward, the last
    block, would hold them until the next forward), and forget the order the units ran in. FSDP2 appends each
    forward's units to that order and clears it only at the end of a backward, reading it then to prefetch the
    unit before each one: for the policy, a stale entry would make its first block prefetch the root's weights
    again; for a reference model, which never runs backward, the list would grow by one entry per unit and
    forward for the whole run. The record is FSDP2's private state (torch 2.13; read in
    torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py, `_record_post_forward`)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    state = model._get_fsdp_state() if isinstance(model, FSDPModule) else None
    order = getattr(state._comm_ctx, "post_forward_order", None) if state is not None else None
    if order is None:  # no FSDP state, or before the model's first forward (FSDP2 sets the record up lazily)
        return
    order.clear()
    for st in state._state_ctx.all_states:
        for group in st._fsdp_param_groups:
            group._post_forward_indices.clear()
