"""Cost of the per-rank memory tracker: runs with memory.track_peak off and on, alternated in one process.

Prints per setting:
- the median step time of "off" and "on" runs (noisy on a shared machine);
- the time spent inside the tracker's own record calls (step_start, phase and
  the per-block hooks) as a share of the step time: the direct cost, which is
  what the <= 2% goal is about;
- the time inside the per-log-step all_gather of peaks, which with several
  ranks is mostly waiting for the slowest rank (time the next collective of
  the step would otherwise wait).

Usage:
  python benchmarks/memory_overhead.py [CONFIG] [--steps 20] [--rounds 2] [key=value ...]
  torchrun --nproc-per-node 2 benchmarks/memory_overhead.py ...   (several ranks)
Without CONFIG it uses the built-in demo model (fsdptrain/demo.yaml). Logging
happens every step, so the all_gather of peaks is in every step (worst case).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fsdptrain.config.schema import load_config
from fsdptrain.dist import distributed
from fsdptrain.memory import tracker as trk
from fsdptrain.trainer import train

SPENT = {"records": 0.0, "gather": 0.0, "depth": 0}


def _timed(fn, bucket: str):
    def wrapper(*a, **k):  # only the outermost tracker call counts (phase() calls _record())
        SPENT["depth"] += 1
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            SPENT["depth"] -= 1
            if SPENT["depth"] == 0:
                SPENT[bucket] += time.perf_counter() - t
    return wrapper


# Time every tracker entry point, including records made from per-block hooks.
for name in ("step_start", "phase", "gather", "_record"):
    setattr(trk.MemoryTracker, name,
            _timed(getattr(trk.MemoryTracker, name), "gather" if name == "gather" else "records"))


def run(cfg_path: str | None, overrides: list[str], on: bool, per_module: bool, steps: int, out: Path,
        is_main: bool) -> tuple[list[float], float, float]:
    cfg = load_config(cfg_path, [*overrides, f"output_dir={out}", f"train.max_steps={steps}", "logging.log_every=1",
                                 "logging.tensorboard=false", "logging.progress=none",
                                 f"memory.track_peak={str(on).lower()}",
                                 f"memory.per_module={str(per_module).lower()}"])
    SPENT["records"] = SPENT["gather"] = 0.0
    train(cfg)
    if not is_main:  # metrics.jsonl is rank 0's; steps are in lockstep, so its times stand for all ranks
        return [1.0] * steps, 0.0, 0.0
    times = [json.loads(x)["step_time_s"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    return times, SPENT["records"], SPENT["gather"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the medians")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides, args.config = [args.config, *args.overrides], None
    info = distributed.init("auto")
    rows = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        shared = [tmp_dir]
        if info.world_size > 1:  # every rank uses rank 0's folder
            torch.distributed.broadcast_object_list(shared, src=0)
        tmp = shared[0]
        for label, per_module in (("phases", False), ("phases + per-block hooks", True)):
            off, on, rec, gat, total_on = [], [], 0.0, 0.0, 0.0
            for r in range(args.rounds):
                for flag in (False, True):
                    out = Path(tmp) / f"{label[:6]}-{r}-{flag}"
                    times, t_rec, t_gat = run(args.config, args.overrides, flag, per_module, args.steps, out,
                                              info.is_main)
                    (on if flag else off).extend(times[args.warmup:])
                    if flag:
                        rec += t_rec
                        gat += t_gat
                        total_on += sum(times)
            rows.append((label, statistics.median(off), statistics.median(on), rec / total_on, gat / total_on))
    if info.is_main:
        print(f"\nmemory tracker overhead ({info.world_size} rank(s), device {info.device_type}, "
              f"{args.rounds} x {args.steps} steps per setting, gather every step)")
        print("| tracker | step off (median s) | step on (median s) | on/off - 1 | records / step time "
              "| gather / step time |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for label, a, b, rec, gat in rows:
            print(f"| {label} | {a:.4f} | {b:.4f} | {100 * (b / a - 1):+.1f}% | {100 * rec:.2f}% | {100 * gat:.2f}% |")
    distributed.shutdown(info)


if __name__ == "__main__":
    main()
