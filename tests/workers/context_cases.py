"""Ulysses attention against whole-sequence attention, under torchrun with N ranks (tests/test_context_parallel.py).

Usage: python -m tests.workers.context_cases
Rank 0 prints one line per case: `case <name> ranks <N> out <max abs diff> grad <max abs diff of q, k, v
gradients>`, the largest over the ranks,
where the reference is sdpa over the whole rows (float64) and the gradients of a rank's chunk are summed over the
group (each position's query, key and value feed the other ranks' outputs through the all-to-all).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fsdptrain.model import ulysses
from tests.workers import finish

B, H, S, D = 2, 4, 12, 4


def reference_mask(pos: torch.Tensor) -> torch.Tensor:
    """Causal within documents, written independently of ulysses.document_mask: key j visible to query i when
    j <= i and no position restart lies in (j, i]."""
    s = pos.shape[1]
    mask = torch.zeros(pos.shape[0], 1, s, s, dtype=torch.bool)
    for b in range(pos.shape[0]):
        for i in range(s):
            for j in range(i + 1):
                mask[b, 0, i, j] = not any(pos[b, t] == 0 for t in range(j + 1, i + 1))
    return mask


def run_case(name: str, kv_heads: int, pos: torch.Tensor, group: dist.ProcessGroup) -> None:
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    q = torch.randn(B, H, S, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, kv_heads, S, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, kv_heads, S, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(B, S, H, D, dtype=torch.float64)
    rep = H // kv_heads
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                         attn_mask=reference_mask(pos)).transpose(1, 2)
    (ref * w).sum().backward()
    step = S // n
    lo, hi = rank * step, (rank + 1) * step
    local = [t.detach()[:, :, lo:hi].clone().requires_grad_() for t in (q, k, v)]
    with ulysses.sequence(pos):
        out, _ = ulysses.ulysses_attention(None, *local, None, scaling=D ** -0.5)
    (out * w[:, lo:hi]).sum().backward()
    out_diff = (out - ref[:, lo:hi]).abs().max().item()
    grad_diff = 0.0
    for full, part in zip((q, k, v), local):
        total = torch.zeros_like(full.grad)
        total[:, :, lo:hi] = part.grad
        dist.all_reduce(total, group=group)
        grad_diff = max(grad_diff, (total - full.grad).abs().max().item())
    worst = torch.tensor([out_diff, grad_diff], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)  # one line for all ranks (theirs would interleave)
    if rank == 0:
        print(f"case {name} ranks {n} out {worst[0].item():.3e} grad {worst[1].item():.3e}", flush=True)


def main() -> None:
    dist.init_process_group("gloo")
    n = dist.get_world_size()
    group = dist.new_group(list(range(n)))
    ulysses.use_group(group, n)
    plain = torch.arange(S).expand(B, S).contiguous()
    # row 0: documents of 5, 4 and 3 tokens (they straddle the chunks); row 1: 7 tokens and a padding tail
    packed = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]])
    for name, kv_heads, pos in (("split-kv", 2, plain), ("repeat-kv", 1, plain), ("packed", 2, packed),
                                ("packed-repeat", 1, packed)):
        run_case(name, kv_heads, pos, group)
    ulysses.use_group(None, 1)
    dist.destroy_process_group()


if __name__ == "__main__":
    finish(main)
