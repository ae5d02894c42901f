"""parallel.optimizer_offload: nvme vs true (moments in host memory): peak host memory and optimizer step time.

    python benchmarks/nvme_offload.py [--moments-gb 2] [--steps 4] [--dir /tmp/fsdptrain-nvme-bench]

Each mode runs in a fresh process (so its peak resident memory, ru_maxrss, is its own) over the same Llama-like
fp32 parameters and gradients (a 2048-wide model with `--moments-gb` of AdamW moments, 8 bytes per parameter),
as one rank's shards: one warm-up step, then the median of `--steps` steps of the optimizer alone (the part of a
training step the mode changes). Modes:
- memory: CPUOffloadAdamW, the moments in host memory;
- nvme: the moments in a file under --dir, streamed through --buffer-mib of host buffers with direct I/O where
  the file system allows it (what fsdptrain does): every read comes from the drive;
- nvme-buffered: the same through the page cache (as on a file system without O_DIRECT); the file's pages may
  stay cached between steps, as a state smaller than the free memory does;
- nvme-buffered-cold: that, with the file written back and dropped from the page cache before every step, so every
  read comes from the drive (a state larger than the page cache: a 70B model's 280 GB per node).
Before the modes, the drive's sequential write (with fsync) and read (after dropping the file from the page
cache) speed is measured with a file of the state's size under --dir. Prints a Markdown table; "optimizer's
part" is the peak less the resident memory once the parameters and gradients exist (staging, moments or their
buffers, the update's temporaries); the saving is taken on that part, since the whole process's peak varies by a
few hundred MiB from run to run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

WIDTH, FFN = 2048, 5632  # a Llama-1B-like block: 4 attention matrices, 3 MLP matrices, 2 norms


def make_params(moments_bytes: int, seed: int = 0) -> list[list[torch.nn.Parameter]]:
    """[decay group (matrices), no-decay group (norm vectors)] of about moments_bytes / 8 parameters, with
    gradients."""
    g = torch.Generator().manual_seed(seed)
    block = [(WIDTH, WIDTH)] * 4 + [(FFN, WIDTH)] * 3
    per_block = sum(a * b for a, b in block) + 2 * WIDTH
    blocks = max(1, round(moments_bytes / 8 / per_block))
    mats = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for _ in range(blocks) for s in block]
    norms = [torch.nn.Parameter(torch.ones(WIDTH)) for _ in range(2 * blocks)]
    for p in mats + norms:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return [mats, norms]


def child(mode: str, args: argparse.Namespace) -> dict:
    from fsdptrain.train import offload_dir, optim_nvme
    from fsdptrain.train.optim_nvme import NVMeOffloadAdamW
    from fsdptrain.train.optim_offload import CPUOffloadAdamW

    params = make_params(int(args.moments_gb * 2**30))
    n = sum(p.numel() for group in params for p in group)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # parameters + gradients
    groups = [{"params": params[0], "weight_decay": 0.1}, {"params": params[1], "weight_decay": 0.0}]
    hyper = {"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8}
    if mode == "memory":
        opt = CPUOffloadAdamW(groups, **hyper)
    else:
        if mode.startswith("nvme-buffered"):
            optim_nvme.open_direct = lambda path: None
        scratch = offload_dir.claim(args.dir, args.dir + "/run", 0, 1)
        opt = NVMeOffloadAdamW(groups, scratch, int(args.buffer_mib * 2**20), **hyper)
    times = []
    for step in range(args.steps + 1):
        if mode == "nvme-buffered-cold":
            opt.evict_page_cache()
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
        if step == 0 and mode != "memory":
            opt.stats = type(opt.stats)()  # the warm-up step's I/O (the first reads of a fresh file) left out
    out = {"mode": mode, "params": n, "step_s": statistics.median(times[1:]),
           "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "base_rss": base_rss}
    if mode != "memory":
        s = opt.stats
        out.update(io_s=s.io_seconds / args.steps, wait_s=s.wait_seconds / args.steps, hidden=s.hidden_share,
                   read_gb=s.read_bytes / args.steps / 1e9, slots=opt.slots, direct=opt.direct)
        opt.close()
    return out


def drive_speed(folder: Path, nbytes: int) -> tuple[float, float]:
    """(write, read) GB/s of one sequential pass over a file of nbytes in `folder` (fsync'd write; read after the
    file's pages were dropped from the page cache)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fsdptrain-speed-test.bin"
    block = os.urandom(64 * 2**20)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t0 = time.perf_counter()
        done = 0
        while done < nbytes:
            done += os.write(fd, block[:min(len(block), nbytes - done)])
        os.fsync(fd)
        write = nbytes / (time.perf_counter() - t0) / 1e9
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        os.lseek(fd, 0, os.SEEK_SET)
        while os.read(fd, 64 * 2**20):
            pass
        read = nbytes / (time.perf_counter() - t0) / 1e9
    finally:
        os.close(fd)
        path.unlink()
    return write, read


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moments-gb", type=float, default=2.0, help="GiB of AdamW moments (8 bytes per parameter)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--buffer-mib", type=float, default=256.0, help="parallel.offload_buffer_size in MiB")
    ap.add_argument("--dir", default="/tmp/fsdptrain-nvme-bench", help="the offload folder (empty or new)")
    ap.add_argument("--modes", default="memory,nvme,nvme-buffered,nvme-buffered-cold")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    speed_dir = Path(args.dir).with_name(Path(args.dir).name + "-speed")
    write, read = drive_speed(speed_dir, int(args.moments_gb * 2**30))
    speed_dir.rmdir()
    print(f"drive under {args.dir}: sequential write {write:.2f} GB/s (fsync'd), read {read:.2f} GB/s (uncached)")
    rows = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--child", mode, "--moments-gb", str(args.moments_gb), "--steps",
               str(args.steps), "--buffer-mib", str(args.buffer_mib), "--dir", args.dir]
        root = str(Path(__file__).resolve().parent.parent)  # this checkout's fsdptrain, not an installed one
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"{mode}: {proc.stderr.strip()[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    mem = next((r for r in rows if r["mode"] == "memory"), rows[0])
    moments = 8 * mem["params"]
    print(f"\n{mem['params'] / 1e6:.0f}M fp32 parameters, moments {moments / 2**30:.2f} GiB, "
          f"buffer {args.buffer_mib:.0f} MiB, torch threads {torch.get_num_threads()}\n")
    print("| mode | peak RSS (GiB) | optimizer's part (GiB) | optimizer's part saved vs memory, share of the moments | "
          "optimizer step (s) | vs memory | I/O per step (s) | waited (s) | I/O hidden |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        saved = ((mem["peak_rss"] - mem["base_rss"]) - (r["peak_rss"] - r["base_rss"])) / moments
        io = (f"{r['io_s']:.2f} | {r['wait_s']:.2f} | {100 * r['hidden']:.0f}%" if "io_s" in r else "- | - | -")
        name = r["mode"] + (" (direct I/O)" if r.get("direct") else "")
        print(f"| {name} | {r['peak_rss'] / 2**30:.2f} | {(r['peak_rss'] - r['base_rss']) / 2**30:.2f} | "
              f"{100 * saved:.0f}% | {r['step_s']:.2f} | {r['step_s'] / mem['step_s']:.2f}x | {io} |")


if __name__ == "__main__":
    main()
