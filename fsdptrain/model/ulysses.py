"""Ulysses attention: the attention function transformers calls in every layer under context parallelism.

Each rank of a context group holds a contiguous 1/N of the sequence (dist/context.py). Attention needs the whole
sequence, so q, k and v [B, H, S/N, D] go through an all-to-all over the group and come out as [B, H/N, S, D]: the
whole sequence for a slice of the heads. Attention runs there (sdpa), and a second all-to-all turns the output back
into [B, S/N, H, D], this rank's positions for every head, the layout transformers' own attention functions return.
The all-to-all is its own autograd function, so backward sends the gradients the same way back.

Grouped-query attention: when the key/value heads divide by N they are split like the query heads (query head h
uses key/value head h // (H / Hkv), so contiguous slices line up); else they are repeated to H heads first.

The mask: the model builds its mask from its local chunk, which is wrong for the whole sequence, so this
function is registered for attention only (not in transformers' mask interface: the model then builds no mask)
and makes its own from the full row's position ids, set for each micro-batch by the trainer with `sequence`:
causal, and, when positions restart inside a row (packed examples), within each document only, one additive
mask for the micro-batch that every layer shares (`context_mask`: sdpa saves its mask, so a mask per layer would
be a saved S x S tensor per layer). Right padding needs no mask under a causal one (it never precedes a real
token). Without a `sequence` in force (evaluation, `fsdptrain eval`: every rank holds whole rows) it is plain
attention on the local rows, with the same mask made from the position ids the layer was given.

`register` adds the function under NAME; train/build.py builds the model with that attention implementation
when parallel.context_parallel > 1 and `check_model` refuses families that do not call the interface.

Whole-row values. An objective that scores whole sequences (dpo, kto, rm: objectives/) sums per-row values over
the rank's chunk; `row_sum` adds them up over the group while a context-parallel micro-batch is in flight (an
autograd all-reduce: backward sums the group's gradients of the same combined value the same way), so every rank
of the group then holds the whole rows' values and computes the same loss. `holds_last_token` tells which rank's
chunk holds a row's last non-pad token (the reward model's score); `gather_rows` concatenates the group's
per-token values (an autograd all-gather: MoE's router logits for the balancing loss, model/moe.py). Outside a
context-parallel micro-batch all three are the plain single-rank values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError

NAME = "fsdptrain_ulysses"


@dataclass
class _State:
    group: Optional[dist.ProcessGroup] = None  # this rank's context group (set for the run)
    size: int = 1
    index: int = 0  # this rank's chunk of every row (its rank within the group)
    position_ids: Optional[torch.Tensor] = None  # the current micro-batch's full rows' positions [B, S]
    active: bool = False  # a context-parallel micro-batch is in flight
    mask: Optional[torch.Tensor] = None  # its additive mask, made by the first layer, shared by all (context_mask)
    mask_made: bool = False


_state = _State()


def register() -> None:
    """Add the Ulysses attention to transformers' attention functions (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, ulysses_attention)


def use_group(group: Optional[dist.ProcessGroup], size: int) -> None:
    """The run's context group (None, 1: off)."""
    _state.group, _state.size = group, size
    _state.index = dist.get_rank(group) if group is not None else 0
    _state.position_ids, _state.active = None, False


@contextmanager
def sequence(position_ids: Optional[torch.Tensor]) -> Iterator[None]:
    """While a context-parallel micro-batch runs forward and backward (recomputed blocks call attention again in
    backward): its full rows' position ids [B, S] (None: no context parallelism, nothing set)."""
    if position_ids is None:
        yield
        return
    _state.position_ids, _state.active = position_ids, True
    _state.mask, _state.mask_made = None, False
    try:
        yield
    finally:
        _state.position_ids, _state.active = None, False
        _state.mask, _state.mask_made = None, False


def check_model(model: nn.Module, hf_config: Any, size: int) -> None:
    """Refuse, in one line, a model Ulysses cannot split: its attention does not go through transformers'
    attention interface, or N does not divide its attention heads."""
    family = getattr(hf_config, "model_type", type(model).__name__)
    if not getattr(type(model), "_supports_attention_backend", False):
        raise ConfigError(f"parallel.context_parallel: {size}: {family} ({type(model).__name__}) does not call "
                          "transformers' attention interface, so its attention cannot be split over ranks; set "
                          "parallel.context_parallel=1")
    windowed = getattr(hf_config, "sliding_window", None) is not None or any(
        "sliding" in str(t) for t in getattr(hf_config, "layer_types", None) or ())
    capped = getattr(hf_config, "attn_logit_softcapping", None) is not None
    if windowed or capped:
        what = "sliding-window attention" if windowed else "attention logit soft-capping"
        raise ConfigError(f"parallel.context_parallel: {size}: {family} uses {what}, which the Ulysses attention "
                          "does not apply yet; set parallel.context_parallel=1")
    check_heads(getattr(hf_config, "num_attention_heads", None), size, family)


def check_heads(heads: Any, size: int, family: str) -> None:
    """Refuse, in one line, N not dividing the attention heads (each rank attends H/N of them)."""
    if not isinstance(heads, int) or heads % size:
        raise ConfigError(f"parallel.context_parallel: {size} does not divide the {heads} attention heads of "
                          f"{family}; use a divisor of {heads}")


class _SelfAdjoint(torch.autograd.Function):
    """A collective over the group that is its own adjoint: `op(x, group)` in forward, the same `op` of the gradient
    in backward. `exchange` (the all-to-all over dim 0's N parts: each rank's part j goes to rank j and comes back
    there) and `summed` (the all-reduce: every rank's copy of the sum takes a gradient, and each part's gradient is
    their sum; torch.distributed.nn's all_reduce does this too, but is deprecated)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup,  # type: ignore[override]
                op: Callable[[torch.Tensor, dist.ProcessGroup], torch.Tensor]) -> torch.Tensor:
        ctx.group, ctx.op = group, op
        return op(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return ctx.op(grad, ctx.group), None, None


def exchange(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """all_to_all_single of dim 0's N parts. Both buffers contiguous: the collective reads and writes them as flat
    memory, and empty_like of a permuted tensor (autograd hands such gradients) would keep its strides."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dist.all_to_all_single(out, x, group=group)
    return out


def seq_to_heads(x: torch.Tensor, n: int, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, H, S/N, D] (this rank's positions, all heads) -> [B, H/N, S, D] (all positions, this rank's heads)."""
    b, h, s, d = x.shape
    parts = x.reshape(b, n, h // n, s, d).permute(1, 0, 2, 3, 4)  # part j: head group j, to rank j
    got = _SelfAdjoint.apply(parts.contiguous(), group, exchange)  # part j: rank j's positions of my head group
    return got.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * s, d)


def heads_to_seq(x: torch.Tensor, n: int, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, H/N, S, D] -> [B, S/N, H, D], the inverse exchange of `seq_to_heads` (output transposed as
    transformers' attention functions return it)."""
    b, hn, s, d = x.shape
    parts = x.reshape(b, hn, n, s // n, d).permute(2, 0, 1, 3, 4)  # part j: positions of chunk j, to rank j
    got = _SelfAdjoint.apply(parts.contiguous(), group, exchange)  # part j: head group j of this rank's positions
    return got.permute(1, 3, 0, 2, 4).reshape(b, s // n, n * hn, d)


def document_mask(position_ids: torch.Tensor) -> Optional[torch.Tensor]:
    """[B, 1, S, S] bool, True where query i may attend key j: j <= i within the same document (a document
    starts where positions restart at 0); None when no row restarts (the plain causal mask does)."""
    restarts = position_ids[:, 1:] == 0
    if not bool(restarts.any()):
        return None
    doc = torch.cumsum(torch.cat([torch.zeros_like(restarts[:, :1]), restarts], 1).long(), 1)
    s = position_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=position_ids.device).tril()
    return (causal[None] & (doc[:, :, None] == doc[:, None, :]))[:, None]


def context_mask(dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The in-flight micro-batch's mask for sdpa (None: causal), made by the first layer that asks and then shared
    by every layer and by recomputation: additive (0 where a key is visible, -inf elsewhere, in the compute dtype),
    the values sdpa would make of the bool mask itself. sdpa saves its mask for backward, and a bool mask is
    converted inside each call, so every layer would save its own S x S copy; one tensor made here is saved by
    all layers at the cost of one (memory/estimate.py document_mask_bytes)."""
    if not _state.mask_made:
        keep = document_mask(_state.position_ids)
        _state.mask = None if keep is None else torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(
            keep.logical_not(), float("-inf"))
        _state.mask_made = True
    return _state.mask


def repeat_heads(x: torch.Tensor, times: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, Hkv * times, S, D], each head repeated `times` times in place (query-group order)."""
    return x if times == 1 else x.repeat_interleave(times, dim=1)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor],
           dropout: float, scaling: Optional[float]) -> torch.Tensor:
    """sdpa over [B, h, S, D] with key/value heads repeated to the query's; causal when no mask is given."""
    key = repeat_heads(key, query.shape[1] // key.shape[1])
    value = repeat_heads(value, query.shape[1] // value.shape[1])
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                          is_causal=mask is None)


def ulysses_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: q [B, H, s, D], k/v [B, Hkv, s, D] -> ([B, s, H, D], None)."""
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:  # check_model refuses them
        raise ValueError(f"{NAME}: sliding windows and soft-capping are not supported")
    if not _state.active:  # whole rows on this rank (evaluation)
        pos = kwargs.get("position_ids")
        mask = document_mask(pos) if pos is not None else None
        if attention_mask is not None and attention_mask.ndim == 4:
            mask = attention_mask
        return attend(query, key, value, mask, dropout, scaling).transpose(1, 2).contiguous(), None
    n, group = _state.size, _state.group
    if key.shape[1] % n:  # too few key/value heads to split: repeat them to one per query head first
        key = repeat_heads(key, query.shape[1] // key.shape[1])
        value = repeat_heads(value, query.shape[1] // value.shape[1])
    q, k, v = (seq_to_heads(t, n, group) for t in (query, key, value))
    out = attend(q, k, v, context_mask(q.dtype), dropout, scaling)
    return heads_to_seq(out, n, group), None


# ----------------------------------------------------------------------------- whole-row values (objectives)


def summed(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """A contiguous copy of `x` summed over the group (all_reduce works in place on flat memory)."""
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def splitting() -> bool:
    """Whether a context-parallel micro-batch is in flight (each rank holds a chunk of every row)."""
    return _state.active


def row_sum(x: torch.Tensor) -> torch.Tensor:
    """Per-row sums over this rank's chunk -> the whole rows' sums, the same on every rank of the group
    (differentiable); `x` itself when no context-parallel micro-batch is in flight."""
    if not _state.active:
        return x
    return _SelfAdjoint.apply(x, _state.group, summed)


def holds_last_token(input_ids: torch.Tensor, pad_id: Optional[int]) -> torch.Tensor:
    """[B] bool: whether this rank's chunk holds each row's last non-pad token, the token transformers'
    sequence-classification models score (a row of padding only: its first token, in chunk 0; no pad id: the
    last position, in the last chunk). All True when no context-parallel micro-batch is in flight."""
    if not _state.active:
        return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    if pad_id is None:
        return torch.full((input_ids.shape[0],), _state.index == _state.size - 1, device=input_ids.device)
    width = input_ids.shape[1]
    real = input_ids != pad_id
    local = (torch.arange(width, device=input_ids.device) * real).argmax(-1)
    mine = torch.where(real.any(-1) | (_state.index == 0), _state.index * width + local, -1)
    last = mine.clone()
    dist.all_reduce(last, op=dist.ReduceOp.MAX, group=_state.group)
    return mine == last


class _GroupGather(torch.autograd.Function):
    """The group's tensors concatenated along dim 0 (rank order) in forward; in backward each rank's slice of the
    gradients of the group's copies summed (the group all-reduces the whole gradient: gloo has no reduce-scatter;
    what is gathered here, router logits, is small beside the activations)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, size: int, index: int
                ) -> torch.Tensor:  # type: ignore[override]
        ctx.group, ctx.index, ctx.rows = group, index, x.shape[0]
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        total = summed(grad, ctx.group)
        return total[ctx.index * ctx.rows:(ctx.index + 1) * ctx.rows], None, None, None


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """The group's `x` concatenated along dim 0 in rank order (differentiable), the same on every rank; `x` itself
    when no context-parallel micro-batch is in flight."""
    if not _state.active:
        return x
    return _GroupGather.apply(x, _state.group, _state.size, _state.index)
