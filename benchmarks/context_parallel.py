"""Context parallelism on CPU: the per-rank activation peak with CP = 1, 2, 4 against the estimator, and the step time.

A tiny Llama (hidden 256, 4 blocks, 8 heads, 4 key/value heads) trains 3 steps on rows of exactly --seq tokens
(default 8192), one row per step, fp32, sdpa, with parallel.context_parallel N on N ranks (gloo), so every run
reads the same tokens (the losses agree). Step 2 is measured by category with memory.breakdown_steps (torch's
FSDPMemTracker on the real tensors: memory/breakdown.py); its largest "activations" value on each rank (the
tracker labels every tensor made in forward an activation: at the end of forward, what every block saved plus
the logits) is set against the estimator's "activations (saved for backward)" line for the same config. Step
time: step 3's `step_time_s` from metrics.jsonl (step 2 runs under the tracker, which slows it; gloo all-to-alls
between processes on one host's CPU cores: it says what the exchange costs on CPU, little about NVLink).
All-to-all bytes: the estimator's communication line (per rank per step).

Usage (each N launches its own torchrun; the table is printed at the end):
  python benchmarks/context_parallel.py [--seq 8192] [--sizes 1,2,4] [--threads 1]

`--estimates` prints instead docs/long-context.md's estimate tables (no training): Llama-3.1-8B at 32k, 64k and
128k tokens on 1 x 8 x 80 GiB and Qwen2.5-32B at 32k and 128k on 2 x 8 x 80 GiB with CP 1, 2, 4, 8, each the
same numbers as `fsdptrain estimate CONFIG OVERRIDES` (the model is built once per family; ESTIMATES lists the
configs and overrides).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's fsdptrain, in the driver and (PYTHONPATH below) in the ranks

MODEL = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 8192, "vocab_size": 128}
STEPS = 3


def overrides(out: Path, n: int, seq: int) -> list[str]:
    """The run's config: one row of `seq` tokens per data rank and step, step 2 measured by category."""
    return [f"output_dir={out}", f"train.max_steps={STEPS}", "train.micro_batch_size=1", "train.grad_accum_steps=1",
            f"data.max_length={seq}", "data.shuffle=false", "logging.tensorboard=false", "logging.progress=none",
            "logging.log_every=1", "train.eval_every=0", "data.val_size=0", "parallel.device=cpu",
            "parallel.precision=fp32", "model.attn_implementation=sdpa", f"parallel.context_parallel={n}",
            "memory.breakdown_steps=[2]", "checkpoint.save_every=0", "checkpoint.export_hf=false"]


def config(out: Path, n: int, seq: int):
    from fsdptrain.config.schema import load_config

    cfg = load_config(None, overrides(out, n, seq))
    cfg.model.hf_config = dict(MODEL, max_position_embeddings=max(seq, MODEL["max_position_embeddings"]))
    return cfg


def worker(out: Path, n: int, seq: int) -> None:
    """One rank of a CP=n run (under torchrun)."""
    from fsdptrain.data.encode import IGNORE, Example
    from fsdptrain.trainer import train

    rows = []
    for i in range(STEPS):  # one data rank: the context group reads the same row
        ids = [(7 * i + k) % 120 + 4 for k in range(seq)]
        rows.append(Example(ids, [IGNORE] + ids[1:]))
    train(config(out, n, seq), examples=rows)


def estimated(out: Path, n: int, seq: int) -> tuple[int, int]:
    """(activation line, all-to-all bytes per rank per step) of the estimate for the run."""
    from fsdptrain.memory import estimate

    est = estimate.estimate(config(out, n, seq), 1, n, 80 << 30)
    comm = estimate.communication(est)
    return est.terms["activations (saved for backward)"], comm.all_to_all


def measure(root: Path, n: int, seq: int, threads: int) -> dict:
    out = root / f"cp{n}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
           "--master-port", str(29500 + 17 * n + os.getpid() % 997), __file__, "--worker", str(out),
           "--cp", str(n), "--seq", str(seq)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"CP={n} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    peaks = [json.loads((out / "memory" / f"breakdown_step2_rank{r}.json").read_text())["category_max"]["activations"]
             for r in range(n)]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = next(m for m in metrics if m.get("step") == STEPS)
    acts, a2a = estimated(out, n, seq)
    return {"n": n, "measured": max(peaks), "acts": acts, "a2a": a2a, "seconds": last["step_time_s"],
            "loss": last["loss"], "compute": rank_compute(out)}


def rank_compute(out: Path) -> list[float]:
    """Each rank's block compute seconds per step over the run (memory/compute.json, written by every multi-rank
    run: ComputeClock's forward and backward intervals, collectives excluded), or [] for one rank. Under Ulysses
    every rank attends the whole sequence for H/N heads, so these should be equal: the measured reason for no
    causal-balanced split (docs/long-context.md)."""
    path = out / "memory" / "compute.json"
    if not path.exists():
        return []
    return [seconds / max(steps, 1) for seconds, _tokens, steps in json.loads(path.read_text())["ranks"]]


def table(rows: list[dict], seq: int, threads: int) -> str:
    mib = 1 << 20
    lines = [f"tiny Llama (hidden 256, 4 blocks, 8 heads, 4 kv heads), one row of {seq} tokens per step, fp32, sdpa, "
             f"CPU gloo, OMP_NUM_THREADS={threads}; measured = step 2's largest 'activations' of any rank "
             "(memory.breakdown_steps, step 2); step time: step 3",
             "| CP | ranks | measured activations / rank (MiB) | estimated (MiB) | measured / estimated "
             "| step time (s) | block compute / step per rank (s) (slowest / fastest) | all-to-all / rank / step (MiB) "
             "| loss |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        est = r["acts"]
        lines.append(f"| {r['n']} | {r['n']} | {r['measured'] / mib:.1f} | {est / mib:.1f} | "
                     f"{r['measured'] / est:.3f} | {r['seconds']:.2f} | {per_rank(r['compute'])} | "
                     f"{r['a2a'] / mib:.1f} | {r['loss']:.4f} |")
    return "\n".join(lines)


def per_rank(seconds: list[float]) -> str:
    if not seconds:
        return "-"
    return f"{' / '.join(f'{x:.2f}' for x in seconds)} ({max(seconds) / min(seconds):.2f}x)"


# (title, config, nnodes, sequence lengths, overrides): one row of tokens per micro-batch, not packed
ESTIMATES = [
    ("Llama-3.1-8B, 1 x 8 x 80 GiB", "configs/estimate-llama3.1-8b-1x8.yaml", 1, [32768, 65536, 131072],
     ["data.packing=false", "parallel.compile=false"]),
    ("Qwen2.5-32B, 2 x 8 x 80 GiB", "configs/estimate-qwen2.5-32b-2x8-offload.yaml", 2, [32768, 131072],
     ["parallel.cpu_offload=false"]),
]
CHECKPOINTING = ["selective", "full"]


def estimate_tables() -> str:
    from fsdptrain.config.schema import load_config
    from fsdptrain.core.units import GIB
    from fsdptrain.memory import estimate

    out = []
    for title, path, nnodes, seqs, extra in ESTIMATES:
        shape = None
        out += [f"**{title}** (`{path}` with {' '.join(extra)}; per GPU; full fine-tuning, bf16-mixed, AdamW)", "",
                "| tokens per row | CP | tokens per rank | activations, selective | peak, selective | "
                "activations, full | peak, full | FSDP all-gather + reduce-scatter / step | all-to-all / step "
                "| tokens / step |",
                "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for seq in seqs:
            for n in (1, 2, 4, 8):
                row = [f"{seq // 1024}k", str(n)]
                for mode in CHECKPOINTING:
                    cfg = load_config(str(REPO / path), [*extra, f"data.max_length={seq}",
                                                          f"parallel.context_parallel={n}",
                                                          f"parallel.activation_checkpointing={mode}"])
                    shape = shape or estimate.shape_from_config(cfg)
                    est = estimate.estimate(cfg, nnodes, 8, 80 * GIB, shape=shape)
                    if mode == CHECKPOINTING[0]:
                        row.append(str(est.settings.micro_batch * est.settings.local_seq))
                    row += [f"{est.terms['activations (saved for backward)'] / GIB:.1f} GiB",
                            f"{est.peak / GIB:.1f} GiB {'fits' if est.fits else '**no**'}"]
                k = estimate.communication(est)  # the same in both modes: each recomputes every block
                s = est.settings
                row += [f"{(k.all_gather + k.reduce_scatter + k.all_reduce) / GIB:.0f} GiB",
                        f"{k.all_to_all / GIB:.1f} GiB" if n > 1 else "-",
                        f"{s.data_world * s.micro_batch * s.cfg.train.grad_accum_steps * seq // 1024}k"]
                out.append("| " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--sizes", default="1,2,4")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    ap.add_argument("--estimates", action="store_true", help="print the estimate tables instead (no training)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cp", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(Path(args.worker), args.cp, args.seq)
        return
    if args.estimates:
        print(estimate_tables())
        return
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for n in (int(x) for x in args.sizes.split(",")):
            rows.append(measure(Path(tmp), n, args.seq, args.threads))
            print(f"CP={n}: measured {rows[-1]['measured'] / (1 << 20):.1f} MiB", file=sys.stderr, flush=True)
    print(table(rows, args.seq, args.threads))


if __name__ == "__main__":
    main()
