"""A DPO step vs an SFT step on the same tokens, and LoRA DPO vs full DPO peak memory (CPU, fp32).

    PYTHONPATH=. python benchmarks/preference_step.py [--hidden 512] [--layers 4] [--vocab 4096] [--seq 256]
                                                      [--pairs 2] [--steps 5] [--rank 16]

Each configuration runs in a process of its own (a world of one): a random Llama-shaped model through the
trainer's own setup, and the trainer's train_step timed on one fixed micro-batch: sft on 2 x pairs rows, dpo
(sigmoid) on `pairs` pairs made of the same rows (chosen rows then rejected rows: the same tokens, the same
labels), with full fine-tuning and with LoRA. A full-fine-tuning DPO step adds the frozen reference copy's no-grad
forward to the policy's forward, backward and update; a LoRA DPO step runs the policy itself with its adapters off
as the reference.

Memory, two numbers per run: the tensor bytes torch's FSDPMemTracker attributes over a step (memory.trace's
measure_steps on the real tensors: the policy's and the reference copy's shards, gathered weights, gradients,
optimizer state, activations, temporaries; the peak of the steps after the first), and the process's peak RSS
that fsdptrain's memory tracker records on CPU (VmHWM, reset per phase: Python, libraries and allocator caches
included). Prints a table: median step time, its ratio to the SFT step of the same method, the tracked peak, the
peak RSS and `fsdptrain estimate`'s analytic peak of the same config.
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
RUNS = [("sft", "full"), ("dpo", "full"), ("sft", "lora"), ("dpo", "lora")]


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


def run(objective: str, method: str, args, tmp: str) -> dict:
    from fsdptrain.config.schema import load_config
    from fsdptrain.data import pipeline
    from fsdptrain.data.encode import Pair
    from fsdptrain.dist import distributed
    from fsdptrain.memory import estimate, trace
    from fsdptrain.objectives.choose import needs_reference_model
    from fsdptrain.train.build import build_reference
    from fsdptrain.trainer import setup, train_step

    name = f"{objective}-{method}"
    units = args.pairs if objective == "dpo" else 2 * args.pairs
    overrides = [f"output_dir={tmp}/{name}", "parallel.device=cpu", "parallel.precision=fp32",
                 "logging.tensorboard=false", "logging.progress=none", "memory.track_peak=true",
                 "checkpoint.save_at_end=false", f"train.micro_batch_size={units}", f"train.objective={objective}",
                 f"data.max_length={args.seq}", f"train.max_steps={args.steps + 1}",
                 f"model.hf_config={{model_type: llama, hidden_size: {args.hidden}, intermediate_size: "
                 f"{4 * args.hidden}, num_hidden_layers: {args.layers}, num_attention_heads: 8, "
                 f"num_key_value_heads: 4, vocab_size: {args.vocab}, tie_word_embeddings: false}}"]
    if method == "lora":
        overrides += ["finetune.method=lora", f"finetune.lora.rank={args.rank}", "finetune.lora.target=all"]
    cfg = load_config(None, overrides)
    base = rows(args)
    n = args.pairs
    # the same rows either way: sft takes them as examples, dpo as pairs (row i and row n + i)
    examples = base if objective == "sft" else [Pair(base[i], base[n + i]) for i in range(n)]
    info = distributed.init("cpu")
    try:
        r = setup(cfg, info, examples * (args.steps + 2))
        batches = next(iter(pipeline.batches(cfg, r.sampler, r.examples, r.tokenizer.pad_token_id, 0, r.total_steps,
                                             "cpu")))  # one step: one micro-batch
        batch = batches[0]
        assert batch["input_ids"].shape == (2 * n, args.seq), batch["input_ids"].shape
        times = []
        for _ in range(args.steps + 1):  # the same micro-batch every step; the first step warms up
            t0 = time.perf_counter()
            train_step(r, batches)
            times.append(time.perf_counter() - t0)
        rss = [json.loads(line) for line in (Path(cfg.output_dir) / "memory" / "rank0.jsonl").read_text().splitlines()]
        rss_peak = max(rec.get("allocated_peak", 0) for rec in rss if rec.get("step", 0) >= 2)
        # tensor bytes of 3 more steps under torch's FSDPMemTracker (a reference of the run's kind, built again)
        reference = build_reference(cfg, info, r.hf_config, r.sharded) if needs_reference_model(cfg) else None
        also = trace.reference_models(reference, r.model) if reference is not None else ()
        tr = trace.measure_steps(r.model, r.optimizer, trace.step_run(cfg, info, r.model, r.loss_head, reference),
                                 [batches] * 3, cfg.train.max_grad_norm, also)
        tracked = max(p.total for p in tr.phases if p.step >= 2)
        est = estimate.estimate(cfg, 1, 1, 80 << 30)
        if r.lock is not None:
            r.lock.release()
        return {"run": name, "ms": statistics.median(times[1:]) * 1000, "tracked": tracked, "rss": rss_peak,
                "estimate": est.peak}
    finally:
        distributed.shutdown(info)


def in_own_process(name: str) -> dict:
    """Run one configuration in a fresh process (its peak RSS is its own) and read its result line."""
    cmd = [sys.executable, __file__, *sys.argv[1:], "--one", name]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
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
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # run OBJECTIVE-METHOD here, print its JSON
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.one:
            print(json.dumps(run(*args.one.split("-"), args, tmp)))
            return
        results = {f"{o}-{m}": in_own_process(f"{o}-{m}") for o, m in RUNS}
    print(f"{2 * args.pairs} rows x {args.seq} tokens ({args.pairs} pairs for dpo), Llama hidden {args.hidden}, "
          f"{args.layers} blocks, vocab {args.vocab}, fp32, CPU, 1 process; median of {args.steps} steps")
    print("| run | step (ms) | vs sft, same method | tracked peak (FSDPMemTracker) | peak RSS | estimate |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for key, res in results.items():
        sft = results["sft-" + key.split("-")[1]]["ms"]
        print(f"| {key} | {res['ms']:.0f} | {res['ms'] / sft:.2f}x | {format_bytes(res['tracked'])} | "
              f"{format_bytes(res['rss'])} | {format_bytes(res['estimate'])} |")
    full, lora = results["dpo-full"], results["dpo-lora"]
    print(f"dpo lora / dpo full: tracked peak {lora['tracked'] / full['tracked']:.2f}, "
          f"peak RSS {lora['rss'] / full['rss']:.2f}")


if __name__ == "__main__":
    main()
