"""Time of one AdamW step on the CPU: fsdptrain's CPUOffloadAdamW vs torch.optim.AdamW (foreach and fused).

    python benchmarks/optimizer_step.py [--params-m 64] [--repeats 5]

The CPU update is what parallel.optimizer_offload adds to every step (on a GPU
machine the copies to and from pinned memory come on top; here they are plain
host copies, counted in CPUOffloadAdamW's column). Parameters are split into
Llama-like tensors; the median of `--repeats` steps after one warm-up is kept,
the three optimizers alternating so that none always runs on a warmer cache.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fsdptrain.train.optim_offload import CPUOffloadAdamW


def make_params(total: int, seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    sizes, left = [], total
    while left > 0:  # a block's worth: one big matrix, three smaller ones, a norm vector
        for n in (total // 8, total // 32, total // 32, total // 32, 2048):
            n = min(n, left)
            if n > 0:
                sizes.append(n)
                left -= n
    params = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    return params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params-m", type=float, default=64.0, help="millions of fp32 parameters")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    n = int(args.params_m * 1e6)
    kw = {"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    opts = {
        "fsdptrain CPUOffloadAdamW": CPUOffloadAdamW(make_params(n, 0), **kw),
        "torch AdamW foreach": torch.optim.AdamW(make_params(n, 0), foreach=True, **kw),
        "torch AdamW fused": torch.optim.AdamW(make_params(n, 0), fused=True, **kw),
    }
    times: dict[str, list[float]] = {name: [] for name in opts}
    for opt in opts.values():
        opt.step()  # creates the state
    for _ in range(args.repeats):
        for name, opt in opts.items():
            t = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t)
    first = [p.detach() for p in opts["torch AdamW fused"].param_groups[0]["params"]]
    ours = [p.detach() for p in opts["fsdptrain CPUOffloadAdamW"].param_groups[0]["params"]]
    diff = max((a - b).abs().max().item() for a, b in zip(first, ours))
    print(f"\n{n / 1e6:.1f}M fp32 parameters, {torch.get_num_threads()} threads, median of {args.repeats} steps; "
          f"max |CPUOffloadAdamW - fused AdamW| after {args.repeats + 1} steps: {diff:.1e}")
    print("| optimizer | step time (s) | parameters/s (M) |")
    print("| --- | ---: | ---: |")
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name, t in med.items():
        print(f"| {name} | {t:.4f} | {n / t / 1e6:,.0f} |")
    print("\ntorch AdamW foreach / CPUOffloadAdamW step time = "
          f"{med['torch AdamW foreach'] / med['fsdptrain CPUOffloadAdamW']:.2f}")


if __name__ == "__main__":
    main()
