"""data.balance: speed against a slow rank, on CPU: rank 1 held to a share of one core by a CPU cgroup quota.

    sudo python benchmarks/balance_throttle.py [--quota 0.5] [--steps 30]
    sudo python benchmarks/balance_throttle.py --fast-quota 0.5 --quota 0.25 --weight 16   # on a busy machine

Four 2-rank runs of the same training (one CPU thread per rank; the machine needs 2 free cores):
  even       rank 1 free (or at --fast-quota like rank 0), data.balance none: both ranks at the same speed;
  throttled  rank 1 under the quota, data.balance none: the fast rank waits for the slow one at every block;
  balanced   rank 1 under the quota, data.balance speed: shares measured after step 3 and every 5 steps;
  weights    rank 1 under the quota, data.balance [2, 1] (--weights): the split a 2:1 speed ratio calls for.
Median step time over the steps after the first 10 (the shares have settled by then). On a machine other
processes keep busy a free rank gets less than a core and a quota of half a core may never bind: give every rank
a quota (--fast-quota) and a scheduling weight above the others' (--weight), so that the quotas set the speeds.

The ideal is the step's tokens over the two ranks' summed speeds, each rank's speed measured over its whole step
while nobody waits for it: rank 0's in the even run (both ranks equal), rank 1's in the throttled run (everyone
waits for it, it waits for no one). With equal tokens per rank that is 2 e t / (e + t), e and t the even and
throttled median steps. It is reachable when every part of a rank's step slows by the same factor and the
shares allow for the part of a step that does not grow with tokens (data.balance: speed evens out what its clock
times, the blocks' compute). The ratio the balance measured, and the ideal by it (the previous definition, even x
2 / (1 + r), which grades the measure by itself), are printed beside it.

Per run and rank: the blocks' compute per step (the clock data.balance reads, memory/compute.json, steps 2 on),
the process's CPU seconds per step (all its threads, and in brackets its main thread's: the rest is gloo's
communication threads and other helpers; /proc, over the timed steps), and the share of the quota's
periods in which rank 1's cgroup was throttled. The load average before and after every run says how busy the
machine was. Needs root (cgroup v1 cpu.cfs_quota_us or v2 cpu.max). Writes every number to results.json in the
printed folder.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 512}
FIRST = 10  # steps left out of the medians and the CPU rates (start-up, shares settling)
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    """One run's numbers."""

    name: str
    times: list[float]  # step seconds (metrics.jsonl)
    compute: list[list[float]]  # per rank [blocks' compute seconds, tokens, steps] (memory/compute.json)
    cpu_per_step: list[float]  # per rank: CPU seconds per step of all threads, then of the main thread
    throttled: float | None  # rank 1's cgroup: throttled periods / periods over the run
    load: tuple[float, float]  # the 1-minute load average before and after
    lines: list[str] = field(default_factory=list)  # its time: / balance lines

    @property
    def median(self) -> float:
        return statistics.median(self.times[FIRST:])


@dataclass
class Group:
    """A CPU cgroup: its folder, the file a pid is written into, its cpu.stat."""

    path: Path
    procs: Path
    stat: Path


def make_cgroup(name: str, quota: float, period_ms: float, weight: float) -> Group:
    """A fresh CPU cgroup limited to `quota` of one core per period of `period_ms`, at `weight` times the default
    scheduling weight (above 1 on a busy machine, so that the quota binds rather than the other processes)."""
    v1 = Path("/sys/fs/cgroup/cpu")
    period = int(period_ms * 1000)
    if (v1 / "cpu.cfs_quota_us").is_file():
        group = v1 / f"fsdptrain-{name}-{os.getpid()}"
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text(str(period))
        (group / "cpu.cfs_quota_us").write_text(str(int(quota * period)) if quota else "-1")
        (group / "cpu.shares").write_text(str(int(1024 * weight)))
    else:
        group = Path("/sys/fs/cgroup") / f"fsdptrain-{name}-{os.getpid()}"
        group.mkdir()
        (group / "cpu.max").write_text(f"{int(quota * period) if quota else 'max'} {period}")
        (group / "cpu.weight").write_text(str(min(10000, int(100 * weight))))
    return Group(group, group / "cgroup.procs", group / "cpu.stat")


def cpu_stat(path: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}


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


def cpu_seconds(stat: Path) -> float | None:
    """User + system CPU seconds from a /proc stat file (a process's: all its threads); None once it is gone."""
    try:
        fields = stat.read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14 and 15 of stat)


def process_and_main_thread(pid: int) -> list[float | None]:
    """CPU seconds of the process (all threads) and of its main thread (the training loop; the rest is gloo's and
    the other helper threads')."""
    return [cpu_seconds(Path(f"/proc/{pid}/stat")), cpu_seconds(Path(f"/proc/{pid}/task/{pid}/stat"))]


def steps_done(out: Path) -> int:
    try:
        return (out / "metrics.jsonl").read_text().count("\n")
    except OSError:
        return 0


def watch(proc: subprocess.Popen, out: Path, pids: list[int]) -> list[float]:
    """Poll the ranks' CPU seconds until the run ends: per rank, the CPU seconds per step of the process and of its
    main thread ([rank 0's, rank 0's main thread's, rank 1's, ...]), from step FIRST to the last step seen while
    both processes were alive."""
    start: tuple[int, list[float]] | None = None
    last: tuple[int, list[float]] | None = None
    while proc.poll() is None:
        done, cpu = steps_done(out), [c for p in pids for c in process_and_main_thread(p)]
        if None not in cpu:
            if start is None and done >= FIRST:
                start = (done, cpu)
            if start is not None and done > start[0]:
                last = (done, cpu)
        time.sleep(0.1)
    if start is None or last is None:
        return [0.0] * 2 * len(pids)
    return [(b - a) / (last[0] - start[0]) for a, b in zip(start[1], last[1])]


def run(root: Path, name: str, a: argparse.Namespace, balance: str, groups: list[Group]) -> Result:
    """One 2-rank training run, rank r's process in groups[r]; rank 1's group is the slow one in the throttled
    runs."""
    out = root / name
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(29400 + os.getpid() % 500), "-m", "fsdptrain", "train", f"output_dir={out}",
            f"model.hf_config={json.dumps(MODEL)}", "data.synthetic_task=sort", "data.synthetic_examples=4000",
            "data.max_length=128", f"train.micro_batch_size={a.micro_batch}", f"train.grad_accum_steps={a.accum}",
            f"train.max_steps={a.steps}",
            "parallel.precision=fp32", "logging.log_every=1", "logging.tensorboard=false", "logging.progress=lines",
            "checkpoint.save_every=0", f"data.balance={balance}", "data.balance_every=5", "data.val_size=0",
            "train.eval_every=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    load0 = os.getloadavg()[0]
    before = cpu_stat(groups[1].stat)
    log = root / f"{name}.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        pids = [rank_pid(out, r, deadline) for r in range(2)]
        for pid, group in zip(pids, groups):
            group.procs.write_text(str(pid))
        cpu = watch(proc, out, pids)
    text = log.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"run {name} failed:\n{text[-3000:]}")
    after = cpu_stat(groups[1].stat)
    periods = after["nr_periods"] - before["nr_periods"]
    throttled = (after["nr_throttled"] - before["nr_throttled"]) / periods if periods else None
    times = [json.loads(line)["step_time_s"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    compute = json.loads((out / "memory" / "compute.json").read_text())["ranks"]
    lines = [x for x in text.splitlines() if x.startswith(("time: ", "data: balance", "balance: "))]
    return Result(name, times, compute, cpu, throttled, (load0, os.getloadavg()[0]), lines)


def report(results: dict[str, Result], a: argparse.Namespace) -> None:
    """The breakdown per run and rank, then the table of median steps against the throttled run and the ideal."""
    even, throttled = results["even"].median, results["throttled"].median
    ideal = 2 * even * throttled / (even + throttled)
    fast = f"{a.fast_quota:g} of a core each" if a.fast_quota else "unlimited"
    print(f"rank 1 at {a.quota:g} of a core (the others {fast}), quota period {a.period_ms:g} ms, scheduling weight "
          f"{a.weight:g}x; {a.accum} micro-steps of {a.micro_batch} x 128 tokens per rank; medians over steps "
          f"{FIRST + 1}-{a.steps}")
    for r in results.values():
        for line in r.lines:
            print(f"  {r.name}: {line}")
    print("\n| run | median step (s) | rank 0 compute / CPU (main thread) per step (s) | rank 1 compute / CPU (main "
          "thread) per step (s) | rank 1 throttled | load before/after |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results.values():
        per = [f"{s / max(n, 1):.3f} / {c:.3f} ({m:.3f})"
               for (s, _, n), c, m in zip(r.compute, r.cpu_per_step[::2], r.cpu_per_step[1::2])]
        thr = f"{r.throttled:.0%} of periods" if r.throttled is not None else "-"  # rank 1's group
        print(f"| {r.name} | {r.median:.3f} | {per[0]} | {per[1]} | {thr} | {r.load[0]:.1f} / {r.load[1]:.1f} |")
    bal = results.get("balanced")
    measured = ""
    if bal is not None and (m := re.findall(r"compute speed per rank \[(\d+), (\d+)\]", "\n".join(bal.lines))):
        v0, v1 = (float(x) for x in m[-1])
        shares = re.findall(r"shares of each step's tokens now \[([\d.]+), ([\d.]+)\]", "\n".join(bal.lines))[-1]
        measured = (f"; the balance measured a compute speed ratio of {v1 / v0:.2f} and settled on shares "
                    f"[{shares[0]}, {shares[1]}] (by that ratio the ideal would be {even * 2 / (1 + v1 / v0):.3f} s)")
    print(f"\nwhole-step speed ratio of rank 1 to rank 0: {even / throttled:.2f} (even {even:.3f} s / throttled "
          f"{throttled:.3f} s){measured}\n")
    print("| run | median step (s) | vs throttled | vs ideal |")
    print("| --- | --- | --- | --- |")
    for r in results.values():
        print(f"| {r.name} | {r.median:.3f} | {r.median / throttled:.2f}x | {r.median / ideal:.2f}x |")
    print(f"| ideal (2 e t / (e + t)) | {ideal:.3f} | {ideal / throttled:.2f}x | 1.00x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quota", type=float, default=0.5, help="rank 1's share of one core")
    ap.add_argument("--fast-quota", type=float, default=0.0,
                    help="every unthrottled rank's share of one core (default: no limit). On a busy machine give the "
                         "ranks a quota each (e.g. 0.5 and --quota 0.25) and --weight: the quotas then set the ranks' "
                         "speeds, not the other processes")
    ap.add_argument("--period-ms", type=float, default=100.0, help="the quota's period (the kernel's default: 100)")
    ap.add_argument("--weight", type=float, default=1.0, help="the ranks' scheduling weight, times the default")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--micro-batch", type=int, default=16, help="examples per rank and micro-step (128 tokens each)")
    ap.add_argument("--accum", type=int, default=2, help="micro-steps per step (each gathers every block's weights "
                    "twice and reduce-scatters their gradients: work per step that does not grow with tokens)")
    ap.add_argument("--weights", default="[2,1]", help="the fixed weights of the last run ('' to skip it)")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="balance-"))
    groups = [make_cgroup(n, q, a.period_ms, a.weight) for n, q in
              (("rank0", a.fast_quota), ("rank1", a.fast_quota), ("slow", a.quota))]
    free, slow = groups[:2], [groups[0], groups[2]]
    runs = [("even", "none", free), ("throttled", "none", slow), ("balanced", "speed", slow)]
    if a.weights:
        runs.append((f"weights {a.weights}", a.weights, slow))
    results: dict[str, Result] = {}
    try:
        for name, balance, into in runs:
            results[name] = run(root, name.split()[0], a, balance, into)
            results[name].name = name
    finally:
        time.sleep(0.5)
        for g in groups:
            g.path.rmdir()
    (root / "results.json").write_text(json.dumps({k: asdict(v) for k, v in results.items()}, indent=1) + "\n")
    report(results, a)
    print(f"\nevery number: {root / 'results.json'}")


if __name__ == "__main__":
    main()
