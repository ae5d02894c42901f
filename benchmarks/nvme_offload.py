"""parallel.optimizer_offload: nvme vs true (moments in host memory): peak host memory and optimizer step time.

    python benchmarks/nvme_offload.py [--moments-gb 2] [--steps 4] [--dir /tmp/fsdptrain-nvme-bench]
                                      [--fwd-bwd-s 0] [--rounds 1] [--modes memory,nvme,...]

Each mode runs in a fresh process (so its peak resident memory, ru_maxrss, is its own) over the same Llama-like
fp32 parameters and gradients (a 2048-wide model with `--moments-gb` of AdamW moments, 8 bytes per parameter),
as one rank's shards: one warm-up step, then the median of `--steps` steps of the optimizer alone (the part of a
training step the mode changes). `--fwd-bwd-s S` puts a stand-in for forward and backward before every step: a
sleep of S seconds, i.e. the GPU computing while the host's cores wait (the host side of a GPU step; it does not
model a CPU-only step, whose forward and backward would use the cores); the stream reads the next step's first
chunks and writes the last step's last chunks during it. Modes:
- memory: CPUOffloadAdamW, the moments in host memory;
- nvme: the moments in a file under --dir, streamed through --buffer-mib of host buffers with direct I/O where
  the file system allows it (what fsdptrain does): every read comes from the drive;
- nvme-within-step: that, with each step waiting for its own writes and reading nothing ahead (the stream
  before it crossed the step boundary): what the reads ahead and writes behind hide;
- nvme-noio: that, with the reads and writes skipped: the stream's own cost (threads, hand-offs, views), what a
  drive that keeps up and copies by DMA would add;
- nvme-buffered: the stream through the page cache (as on a file system without O_DIRECT); the file's pages may
  stay cached between steps, as a state smaller than the free memory does;
- nvme-buffered-cold: that, with the file written back and dropped from the page cache before every step
  (outside the timing; this also finishes the last step's writes), so every read comes from the drive (a state
  larger than the page cache: a 70B model's 280 GB per node).
Before the modes, the speed of --dir itself is measured with a file of the state's size, the way the stream
does its I/O (the file allocated first, 4 KiB-aligned buffers of 64 MiB, pread/pwrite, direct I/O where the file
system takes it, else buffered with the write fsync'd and the file dropped from the page cache before the read),
with the CPU time it costs per GB (near zero for a drive's DMA; tmpfs's reads and writes are CPU copies).
`--interleave` instead runs the modes' optimizers in one process, a step of each in turn, for timings only.
`--rounds R` runs the modes R times in turn (a shared machine's load drifts) and reports the median over rounds.
Prints a Markdown table; "optimizer's part" is the peak less the resident memory once the parameters and gradients
exist (staging, moments or their buffers, the update's temporaries); the saving is taken on that part, since the
whole process's peak varies by a few hundred MiB from run to run. "CPU" is the process's CPU time per step (the
update's threads and the I/O threads' copies in the kernel), which a loaded machine inflates less than the wall
time.
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


def make_optimizer(mode: str, groups: list[dict], args: argparse.Namespace, hyper: dict,
                   slot: tuple[int, int] = (0, 1)) -> torch.optim.Optimizer:
    from fsdptrain.train import offload_dir, optim_nvme
    from fsdptrain.train.optim_nvme import NVMeOffloadAdamW
    from fsdptrain.train.optim_offload import CPUOffloadAdamW

    if mode == "memory":
        return CPUOffloadAdamW(groups, **hyper)
    if mode.startswith("nvme-buffered"):
        optim_nvme.open_direct = lambda path: None
    kind = NVMeOffloadAdamW
    if mode == "nvme-noio":
        class NoIO(NVMeOffloadAdamW):
            def _timed(self, fn, buf, offset):  # the read or write skipped
                return None
        kind = NoIO
    scratch = offload_dir.claim(args.dir, args.dir + "/run", *slot)  # (rank, world): one file per optimizer
    opt = kind(groups, scratch, int(args.buffer_mib * 2**20), **hyper)
    opt.across_steps = mode != "nvme-within-step"
    return opt


def child(mode: str, args: argparse.Namespace) -> dict:
    params = make_params(int(args.moments_gb * 2**30))
    n = sum(p.numel() for group in params for p in group)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # parameters + gradients
    groups = [{"params": params[0], "weight_decay": 0.1}, {"params": params[1], "weight_decay": 0.0}]
    opt = make_optimizer(mode, groups, args, {"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8})
    nvme = mode != "memory"
    opt.step()  # warm-up: the first reads of a fresh file, the buffers' first touch
    if nvme:
        opt.settle()
        opt.stats = type(opt.stats)()
    times, cycles, cpu = [], [], []
    for _ in range(args.steps):
        if mode == "nvme-buffered-cold":
            waited = opt.stats.wait_seconds
            opt.evict_page_cache()
            opt.stats.wait_seconds = waited  # the eviction's wait for the writes is the benchmark's
        t0 = time.perf_counter()
        if args.fwd_bwd_s:
            time.sleep(args.fwd_bwd_s)
        t1, c1 = time.perf_counter(), time.process_time()
        opt.step()
        t2 = time.perf_counter()
        times.append(t2 - t1)
        cycles.append(t2 - t0)
        cpu.append(time.process_time() - c1)
    out = {"mode": mode, "params": n, "step_s": statistics.median(times), "cycle_s": statistics.median(cycles),
           "cpu_s": statistics.median(cpu), "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "base_rss": base_rss}
    if nvme:
        if args.fwd_bwd_s:
            time.sleep(args.fwd_bwd_s)  # the next step's forward and backward: the last writes and reads ahead
        opt.settle()  # what is still running counts: the next step would wait for it
        s = opt.stats
        out.update(io_s=s.io_seconds / args.steps, wait_s=s.wait_seconds / args.steps, hidden=s.hidden_share,
                   read_gb=s.read_bytes / args.steps / 1e9, slots=opt.slots, direct=opt.direct)
        opt.close()
    return out


def interleaved(args: argparse.Namespace) -> None:
    """--interleave: the modes' optimizers over the same parameters in one process, taking steps in turn (with the
    stand-in before each), so that a shared machine's load drifts over all of them alike; prints each mode's median
    step, CPU time and wait for the drive (no memory figures: the process holds every mode at once)."""
    modes = args.modes.split(",")
    if any(m.startswith("nvme-buffered") for m in modes):
        sys.exit("--interleave: the buffered modes turn direct I/O off for the whole process; run them without it")
    params = make_params(int(args.moments_gb * 2**30))
    groups = [{"params": params[0], "weight_decay": 0.1}, {"params": params[1], "weight_decay": 0.0}]
    hyper = {"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8}
    opts = {m: make_optimizer(m, groups, args, hyper, (i, len(modes))) for i, m in enumerate(modes)}
    for opt in opts.values():
        opt.step()  # warm-up
    rows: dict[str, list[tuple[float, float, float]]] = {m: [] for m in modes}
    for _ in range(args.steps):
        for mode, opt in opts.items():
            stats = getattr(opt, "stats", None)
            waited = stats.wait_seconds if stats else 0.0
            time.sleep(args.fwd_bwd_s)
            t0, c0 = time.perf_counter(), time.process_time()
            opt.step()
            rows[mode].append((time.perf_counter() - t0, time.process_time() - c0,
                               opt.stats.wait_seconds - waited if stats else 0.0))
    print(f"{args.steps} steps of each mode in turn, forward/backward stand-in {args.fwd_bwd_s:g} s, medians:\n")
    print("| mode | optimizer step (s) | CPU (s) | waited for the drive (s) |")
    print("| --- | --- | --- | --- |")
    for mode, r in rows.items():
        step, cpu, wait = (statistics.median(x[i] for x in r) for i in range(3))
        print(f"| {mode} | {step:.2f} | {cpu:.2f} | {wait:.2f} |")
    for opt in opts.values():
        if hasattr(opt, "close"):
            opt.close()


def drive_speed(folder: Path, nbytes: int) -> dict:
    """Write and read GB/s of one sequential pass over a file of about nbytes in `folder`, the CPU seconds per GB
    each cost this process (a drive copies by DMA; tmpfs's "drive" is the CPU), and whether it was direct I/O: the
    stream's way (the file allocated in full first, aligned 64 MiB buffers, pwrite/pread, O_DIRECT where the file
    system takes it; else buffered, the write fsync'd and the file dropped from the page cache before the read)."""
    from fsdptrain.train.optim_nvme import aligned_buffer, open_direct, read_into, write_from

    block = 64 * 2**20
    buf = aligned_buffer(block // 4)
    buf.copy_(torch.randn(block // 4))  # not zeros: a file system must not get away with less work
    blocks = max(1, nbytes // block)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fsdptrain-speed-test.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    direct = open_direct(path)
    io = direct if direct is not None else fd
    out = {"direct": direct is not None}
    try:
        os.posix_fallocate(fd, 0, blocks * block)  # as the optimizer allocates its file
        for name, fn in (("write", write_from), ("read", read_into)):
            if name == "read":
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(blocks):
                fn(io, buf, i * block)
            if name == "write":
                os.fsync(fd)
            gb = blocks * block / 1e9
            out[name] = gb / (time.perf_counter() - t0)
            out[name + "_cpu"] = (time.process_time() - c0) / gb
    finally:
        for d in {fd, io}:
            os.close(d)
        path.unlink()
    return out


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--moments-gb", str(args.moments_gb), "--steps",
           str(args.steps), "--buffer-mib", str(args.buffer_mib), "--dir", args.dir, "--fwd-bwd-s",
           str(args.fwd_bwd_s)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{mode}: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median_row(runs: list[dict]) -> dict:
    """One row per mode: the median over rounds of each timing, the largest peak memory."""
    row = dict(runs[0])
    for key in ("step_s", "cycle_s", "cpu_s", "io_s", "wait_s", "hidden"):
        if key in row:
            row[key] = statistics.median(r[key] for r in runs)
    row["peak_rss"] = max(r["peak_rss"] for r in runs)
    row["base_rss"] = max(r["base_rss"] for r in runs)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moments-gb", type=float, default=2.0, help="GiB of AdamW moments (8 bytes per parameter)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--buffer-mib", type=float, default=256.0, help="parallel.offload_buffer_size in MiB")
    ap.add_argument("--dir", default="/tmp/fsdptrain-nvme-bench", help="the offload folder (empty or new)")
    ap.add_argument("--modes", default="memory,nvme,nvme-within-step,nvme-noio,nvme-buffered,nvme-buffered-cold")
    ap.add_argument("--fwd-bwd-s", type=float, default=0.0, help="seconds of forward/backward stand-in per step")
    ap.add_argument("--rounds", type=int, default=1, help="run the modes this many times in turn")
    ap.add_argument("--interleave", action="store_true", help="all modes in one process, steps in turn (timing only)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.interleave:
        sys.path.insert(0, ROOT)
        interleaved(args)
        return
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    sys.path.insert(0, ROOT)
    folder = Path(args.dir)
    made = not folder.exists()
    speed = drive_speed(folder, int(args.moments_gb * 2**30))
    if made:
        folder.rmdir()
    how = "direct I/O" if speed["direct"] else "buffered, fsync'd write, read after dropping the page cache"
    print(f"{args.dir}: sequential write {speed['write']:.2f} GB/s ({speed['write_cpu']:.3f} CPU s/GB), read "
          f"{speed['read']:.2f} GB/s ({speed['read_cpu']:.3f} CPU s/GB) ({how})")
    modes = args.modes.split(",")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode in modes:
            runs[mode].append(run_mode(mode, args))
    rows = [median_row(runs[m]) for m in modes]
    mem = next((r for r in rows if r["mode"] == "memory"), rows[0])
    moments = 8 * mem["params"]
    stand_in = f", forward/backward stand-in {args.fwd_bwd_s:g} s" if args.fwd_bwd_s else ""
    print(f"\n{mem['params'] / 1e6:.0f}M fp32 parameters, moments {moments / 2**30:.2f} GiB, "
          f"the drive's reads needed for the 1.3x goal (twice the state per memory step) "
          f"{2 * moments / 1e9 / mem['step_s']:.1f} GB/s, buffer {args.buffer_mib:.0f} MiB, "
          f"torch threads {torch.get_num_threads()}, {args.steps} steps x {args.rounds} rounds{stand_in}\n")
    cycle = " | step + stand-in (s) | vs memory" if args.fwd_bwd_s else ""
    print("| mode | peak RSS (GiB) | optimizer's part (GiB) | optimizer's part saved vs memory, share of the moments | "
          f"optimizer step (s) | vs memory | CPU (s) | I/O per step (s) | waited (s) | I/O hidden{cycle} |")
    print("| --- " * (10 + 2 * bool(args.fwd_bwd_s)) + "|")
    for r in rows:
        saved = ((mem["peak_rss"] - mem["base_rss"]) - (r["peak_rss"] - r["base_rss"])) / moments
        io = (f"{r['io_s']:.2f} | {r['wait_s']:.2f} | {100 * r['hidden']:.0f}%" if "io_s" in r else "- | - | -")
        if r["mode"] == "nvme-noio":
            io = f"- | {r['wait_s']:.2f} | -"
        name = r["mode"] + (" (direct I/O)" if r.get("direct") else "")
        more = f" | {r['cycle_s']:.2f} | {r['cycle_s'] / mem['cycle_s']:.2f}x" if args.fwd_bwd_s else ""
        print(f"| {name} | {r['peak_rss'] / 2**30:.2f} | {(r['peak_rss'] - r['base_rss']) / 2**30:.2f} | "
              f"{100 * saved:.0f}% | {r['step_s']:.2f} | {r['step_s'] / mem['step_s']:.2f}x | {r['cpu_s']:.2f} | "
              f"{io}{more} |")


ROOT = str(Path(__file__).resolve().parent.parent)  # this checkout's fsdptrain, not an installed one

if __name__ == "__main__":
    main()
