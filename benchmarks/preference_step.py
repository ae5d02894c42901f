"""A DPO step vs an SFT step on the same tokens, and LoRA DPO vs full DPO peak memory (CPU, fp32).

    PYTHONPATH=. python benchmarks/preference_step.py [--hidden 512] [--layers 4] [--vocab 4096] [--seq 256]
                                                      [--pairs 2] [--steps 5] [--rank 16]

One process per fine-tuning method (full, then LoRA; a world of one), each building two runs through the
trainer's own setup on a random Llama-shaped model: sft on 2 x pairs rows, and dpo (sigmoid) on `pairs` pairs made
of the same rows (chosen rows then rejected rows: the same tokens, the same labels). The trainer's train_step is
timed on one fixed micro-batch, the sft and dpo steps alternating so that both see the same load on a shared
machine; the first of each warms up. Each process computes on one thread and a step's time is its CPU time
(process_time), which other jobs on the machine do not stretch as they do wall time (printed beside it). A
full-fine-tuning DPO step adds the frozen reference copy's no-grad forward to the policy's forward, backward and
update; a LoRA DPO step runs the policy itself with its adapters off as the reference.

Memory: the tensor bytes torch's FSDPMemTracker attributes over a step (memory.trace's measure_steps on the real
tensors, two steps, the second's peak: the policy's and the reference copy's shards, gathered weights, gradients,
optimizer state, activations, temporaries), beside `fsdptrain estimate`'s analytic peak of the same config (not
RSS: both runs share the process).

Prints a table: median step CPU time of each run, the median of the per-iteration dpo / sft ratios, wall times,
tracked and estimated peaks, and the LoRA / full ratio of the DPO peaks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def rows(args) -> list:
    """2 x pairs random rows of args.seq tokens, the first quarter a prompt (IGNORE labels), the rest a response."""
    from fsdptrain.data.encode import IGNORE, Example

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(2 * args.pairs):
        ids = torch.randint(0, args.vocab, (args.seq,), generator=g).tolist()
        cut = args.seq // 4
        out.append(Example(ids, [IGNORE] * cut + ids[cut:]))
    return out


def build(objective: str, method: str, args, tmp: str, info):
    """The trainer's Run of one configuration and its one micro-batch (a list of one, as train_step takes it)."""
    from fsdptrain.config.schema import load_config
    from fsdptrain.data import pipeline
    from fsdptrain.data.encode import Pair
    from fsdptrain.trainer import setup

    units = args.pairs if objective == "dpo" else 2 * args.pairs
    overrides = [f"output_dir={tmp}/{objective}-{method}", "parallel.device=cpu", "parallel.precision=fp32",
                 "logging.tensorboard=false", "logging.progress=none", "memory.track_peak=false",
                 "checkpoint.save_at_end=false", f"train.micro_batch_size={units}", f"train.objective={objective}",
                 f"data.max_length={args.seq}", f"train.max_steps={args.steps + 1}",
                 f"model.hf_config={{model_type: llama, hidden_size: {args.hidden}, intermediate_size: "
                 f"{4 * args.hidden}, num_hidden_layers: {args.layers}, num_attention_heads: 8, "
                 f"num_key_value_heads: 4, vocab_size: {args.vocab}, tie_word_embeddings: false}}"]
    if method == "lora":
        overrides += ["finetune.method=lora", f"finetune.lora.rank={args.rank}", "finetune.lora.target=all"]
    cfg = load_config(None, overrides)
    base, n = rows(args), args.pairs
    # the same rows either way: sft takes them as examples, dpo as pairs (row i and row n + i)
    examples = base if objective == "sft" else [Pair(base[i], base[n + i]) for i in range(n)]
    r = setup(cfg, info, examples * (args.steps + 2))
    batches = next(iter(pipeline.batches(cfg, r.sampler, r.examples, r.tokenizer.pad_token_id, 0, r.total_steps,
                                         "cpu")))
    assert batches[0]["input_ids"].shape == (2 * n, args.seq), batches[0]["input_ids"].shape
    return cfg, r, batches


def tracked_peak(cfg, r, batches, info) -> int:
    """Peak tensor bytes of the second of two steps under FSDPMemTracker (a reference of the run's kind is built
    again for it: the trainer's own is inside its objective)."""
    from fsdptrain.memory import trace
    from fsdptrain.objectives.choose import needs_reference_model
    from fsdptrain.train.build import build_reference

    reference = build_reference(cfg, info, r.hf_config, r.sharded) if needs_reference_model(cfg) else None
    also = trace.reference_models(reference, r.model) if reference is not None else ()
    tr = trace.measure_steps(r.model, r.optimizer, trace.step_run(cfg, info, r.model, r.loss_head, reference),
                             [batches] * 2, cfg.train.max_grad_norm, also)
    return max(p.total for p in tr.phases if p.step == 2)


def run_method(method: str, args) -> dict:
    """sft and dpo steps of `method`, alternating; their median times, ratio and memory."""
    from fsdptrain.dist import distributed
    from fsdptrain.memory import estimate
    from fsdptrain.trainer import train_step

    torch.set_num_threads(1)  # one thread: its CPU time is the step's work, whatever else the machine runs
    info = distributed.init("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            runs = {o: build(o, method, args, tmp, info) for o in ("sft", "dpo")}
            times: dict[str, list[float]] = {"sft": [], "dpo": []}
            walls: dict[str, list[float]] = {"sft": [], "dpo": []}
            for _ in range(args.steps + 1):
                for o, (_, r, batches) in runs.items():
                    t0, w0 = time.process_time(), time.perf_counter()
                    train_step(r, batches)
                    times[o].append(time.process_time() - t0)
                    walls[o].append(time.perf_counter() - w0)
            out = {"method": method}
            for o, (cfg, r, batches) in runs.items():
                out[o] = {"ms": statistics.median(times[o][1:]) * 1000,
                          "wall_ms": statistics.median(walls[o][1:]) * 1000,
                          "tracked": tracked_peak(cfg, r, batches, info),
                          "estimate": estimate.estimate(cfg, 1, 1, 80 << 30).peak}
                if r.lock is not None:
                    r.lock.release()
            out["ratio"] = statistics.median(d / s for s, d in zip(times["sft"][1:], times["dpo"][1:]))
            return out
        finally:
            distributed.shutdown(info)


def in_own_process(method: str) -> dict:
    """Run one method in a fresh process and read its result line."""
    cmd = [sys.executable, __file__, *sys.argv[1:], "--one", method]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(f"{method}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    from fsdptrain.core.units import format_bytes

    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # run one method here, print its JSON line
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_method(args.one, args)))
        return
    t0 = time.perf_counter()
    results = [in_own_process(m) for m in ("full", "lora")]
    print(f"{2 * args.pairs} rows x {args.seq} tokens ({args.pairs} pairs for dpo), Llama hidden {args.hidden}, "
          f"{args.layers} blocks, vocab {args.vocab}, fp32, CPU, 1 process (1 thread) per method; median of "
          f"{args.steps} steps, sft and dpo alternating; {time.perf_counter() - t0:.0f} s")
    print("| method | sft step | dpo step | dpo / sft | (wall: sft, dpo) | sft peak (tracked) | dpo peak (tracked) "
          "| dpo peak (estimate) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for res in results:
        s, d = res["sft"], res["dpo"]
        print(f"| {res['method']} | {s['ms']:.0f} ms | {d['ms']:.0f} ms | {res['ratio']:.2f}x | "
              f"{s['wall_ms']:.0f} ms, {d['wall_ms']:.0f} ms | {format_bytes(s['tracked'])} | "
              f"{format_bytes(d['tracked'])} | {format_bytes(d['estimate'])} |")
    full, lora = results[0]["dpo"], results[1]["dpo"]
    print(f"dpo: lora / full tracked peak {lora['tracked'] / full['tracked']:.2f} "
          f"({format_bytes(lora['tracked'])} / {format_bytes(full['tracked'])})")


if __name__ == "__main__":
    main()
