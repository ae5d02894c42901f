"""data.balance: speed against a slow rank, on CPU: rank 1 held to a share of one core by a CPU cgroup quota.

    sudo python benchmarks/balance_throttle.py [--quota 0.5] [--steps 30]

Three 2-rank runs of the same training (one CPU thread per rank; the machine needs 2 free cores):
  even       no quota, data.balance none: both ranks at full speed (the step time the ideal is scaled from);
  throttled  rank 1 under the quota, data.balance none: the fast rank waits for the slow one at every block;
  balanced   rank 1 under the quota, data.balance speed: shares measured after step 3 and every 5 steps;
  weights    rank 1 under the quota, data.balance [2, 1] (--weights): the split a 2:1 speed ratio calls for.
The ideal for the throttled pair is the even step time x 2 / (1 + r), r = the slow rank's speed over the fast
one's as the balanced run measured it (tokens / the two ranks' summed speeds). Median step time over the steps
after the first 10 (the shares have settled by then). Needs root (cgroup v1 cpu.cfs_quota_us or v2 cpu.max).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 512}


def make_cgroup(quota: float) -> tuple[Path, Path]:
    """A fresh CPU cgroup limited to `quota` of one core: (its folder, the file to write a pid into)."""
    v1 = Path("/sys/fs/cgroup/cpu")
    name = f"fsdptrain-slow-{os.getpid()}"
    if (v1 / "cpu.cfs_quota_us").is_file():
        group = v1 / name
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text(str(int(quota * 100000)))
        return group, group / "cgroup.procs"
    v2 = Path("/sys/fs/cgroup")
    group = v2 / name
    group.mkdir()
    (group / "cpu.max").write_text(f"{int(quota * 100000)} 100000")
    return group, group / "cgroup.procs"


def rank_pid(out: Path, rank: int, deadline: float) -> int:
    """The pid of the training process of `rank` whose command line names `out` (torchrun's workers carry RANK)."""
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes()
                env = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"output_dir={out}".encode() in cmd and b"torch.distributed.run" not in cmd \
                    and f"RANK={rank}".encode() in env:
                return int(proc.name)
        time.sleep(0.05)
    raise SystemExit(f"rank {rank} of {out} did not start")


def run(out: Path, steps: int, balance: str, cgroup: Path | None) -> tuple[list[float], str]:
    """One 2-rank training run: (step times from metrics.jsonl, its output)."""
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(29400 + os.getpid() % 500), "-m", "fsdptrain", "train", f"output_dir={out}",
            f"model.hf_config={json.dumps(MODEL)}", "data.synthetic_task=sort", "data.synthetic_examples=4000",
            "data.max_length=128", "train.micro_batch_size=16", "train.grad_accum_steps=2", f"train.max_steps={steps}",
            "parallel.precision=fp32", "logging.log_every=1", "logging.tensorboard=false", "logging.progress=lines",
            "checkpoint.save_every=0", f"data.balance={balance}", "data.balance_every=5", "data.val_size=0",
            "train.eval_every=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if cgroup is not None:
        cgroup.write_text(str(rank_pid(out, 1, time.monotonic() + 120)))
    text = proc.communicate()[0]
    if proc.returncode != 0:
        raise SystemExit(f"run {out.name} failed:\n{text[-3000:]}")
    times = [json.loads(line)["step_time_s"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return times, text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quota", type=float, default=0.5, help="rank 1's share of one core")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--weights", default="[2,1]", help="the fixed weights of the last run ('' to skip it)")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="balance-"))
    group, procs = make_cgroup(a.quota)
    try:
        even, _ = run(root / "even", a.steps, "none", None)
        throttled, told = run(root / "throttled", a.steps, "none", procs)
        balanced, text = run(root / "balanced", a.steps, "speed", procs)
        weights = run(root / "weights", a.steps, a.weights, procs)[0] if a.weights else None
    finally:
        time.sleep(0.5)
        group.rmdir()
    lines = re.findall(r"balance: step \d+: compute speed per rank \[(\d+), (\d+)\] tokens/s; shares of each "
                       r"step's tokens now \[([\d.]+), ([\d.]+)\]", text)
    v0, v1, s0, s1 = (float(x) for x in lines[-1])
    times = {"even": even, "throttled": throttled, "balanced": balanced}
    if weights:
        times[f"weights {a.weights}"] = weights
    median = {k: statistics.median(t[10:]) for k, t in times.items()}
    ideal = median["even"] * 2 / (1 + v1 / v0)
    print(f"rank 1 at {a.quota:g} of a core; measured compute speeds {v0:.0f} and {v1:.0f} tokens/s "
          f"(ratio {v1 / v0:.2f}); final shares [{s0}, {s1}]; median of steps 11-{a.steps}")
    for line in [x for x in told.splitlines() if x.startswith("time: ")] + \
            [x for x in text.splitlines() if x.startswith(("data: balance", "balance: "))]:
        print(line)
    print("| run | median step (s) | vs throttled | vs ideal |")
    print("| --- | --- | --- | --- |")
    for name in median:
        print(f"| {name} | {median[name]:.3f} | {median[name] / median['throttled']:.2f}x | "
              f"{median[name] / ideal:.2f}x |")
    print(f"| ideal (even x 2 / (1 + {v1 / v0:.2f})) | {ideal:.3f} | {ideal / median['throttled']:.2f}x | 1.00x |")


if __name__ == "__main__":
    main()
