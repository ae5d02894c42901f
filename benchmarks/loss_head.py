"""lm_head + cross-entropy, forward and backward: full logits vs checkpointed chunks vs fsdptrain's fused chunks.

    python benchmarks/loss_head.py [--tokens 8192 --hidden 1024 --vocab 32000 --chunk 2048 --repeats 5]

Times one forward + backward of the loss head alone (hidden states -> summed
cross-entropy, gradients for the hidden states and the weight) three ways, in
one process, alternating: full fp32 logits; chunks under torch.utils.checkpoint
(the common "chunked loss"); and train.loss_chunk_tokens's
fused linear cross-entropy. Prints median times, the ratio to the checkpointed
chunks and, on CUDA, each one's peak allocated memory. bf16 on CUDA, fp32 on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fsdptrain.objectives.loss import ChunkedLossHead


def full(h, w, y, chunk):
    return F.cross_entropy(F.linear(h, w).float(), y, reduction="sum")


def _piece(h, w, y):
    return F.cross_entropy(F.linear(h, w).float(), y, reduction="sum")


def checkpointed(h, w, y, chunk):
    return sum(checkpoint(_piece, h[i:i + chunk], w, y[i:i + chunk], use_reentrant=False)
               for i in range(0, h.size(0), chunk))


def fused(h, w, y, chunk):
    head = ChunkedLossHead(w.size(1), w.size(0), bias=False, device=w.device, dtype=w.dtype)
    head.weight = torch.nn.Parameter(w.detach(), requires_grad=True)
    head.chunk_tokens, head.targets = chunk, y
    loss = head(h)
    fused.weight = head.weight  # where the weight gradient lands
    return loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    g = torch.Generator(device=dev).manual_seed(0)
    h0 = torch.randn(args.tokens, args.hidden, device=dev, dtype=dtype, generator=g)
    w0 = torch.randn(args.vocab, args.hidden, device=dev, dtype=dtype, generator=g) * 0.02
    y = torch.randint(0, args.vocab, (args.tokens,), device=dev, generator=g)

    ways = {"full logits": full, "checkpointed chunks": checkpointed, "fused chunks (fsdptrain)": fused}
    times: dict[str, list[float]] = {k: [] for k in ways}
    peaks: dict[str, int] = {}
    grads = {}
    for rep in range(args.repeats + 1):  # the first round warms up
        for name, fn in ways.items():
            h = h0.clone().requires_grad_(True)
            w = w0.clone().requires_grad_(True)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            loss = fn(h, w, y, args.chunk)
            loss.backward()
            if cuda:
                torch.cuda.synchronize()
                peaks[name] = torch.cuda.max_memory_allocated()
            if rep:
                times[name].append(time.perf_counter() - t)
            wg = fused.weight.grad if fn is fused else w.grad
            grads[name] = (loss.detach().float(), h.grad.float(), wg.float())
    ref = grads["full logits"]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{args.tokens} tokens x hidden {args.hidden} x vocab {args.vocab}, chunks of {args.chunk}, "
          f"{'CUDA bf16' if cuda else f'CPU fp32, {torch.get_num_threads()} threads'}, median of {args.repeats}")
    print("| loss head | forward + backward (s) | vs checkpointed chunks | max grad diff vs full | peak allocated |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in ways:
        diff = max((a - b).abs().max().item() for a, b in zip(grads[name], ref))
        peak = f"{peaks[name] / 2**30:.2f} GiB" if cuda else "n/a"
        print(f"| {name} | {med[name]:.4f} | {med['checkpointed chunks'] / med[name]:.2f}x | {diff:.1e} | {peak} |")


if __name__ == "__main__":
    main()
