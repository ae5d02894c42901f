"""Evaluation cost per token against training cost per token, in one run (the target: eval <= 0.5x train).

    python benchmarks/eval_speed.py [--steps 20 --micro 16 --val 320] [key=value ...]

Builds the demo run (fsdptrain/demo.yaml, or its overrides) with data.val_size --val, times --steps training
steps through the trainer's own train_step and one full evaluation through evaluate_run, and prints seconds per
1,000 target tokens of each and their ratio. One process; the output_dir is a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from fsdptrain.config.schema import load_config
from fsdptrain.data import pipeline
from fsdptrain.dist import distributed
from fsdptrain.trainer import evaluate_run, setup, train_step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--val", type=int, default=320)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, [f"output_dir={out}", f"data.val_size={args.val}", f"train.max_steps={args.steps}",
                                 f"train.micro_batch_size={args.micro}", "logging.progress=none",
                                 "logging.report_to=[]", "checkpoint.save_at_end=false", *args.overrides])
        info = distributed.init(cfg.parallel.device)
        run = setup(cfg, info)
        steps = pipeline.batches(cfg, run.sampler, run.examples, run.tokenizer.pad_token_id, 0, args.steps,
                                 info.device_type)
        run.model.train()
        first = next(steps)
        train_step(run, first)  # warm-up (allocations, first-call overheads)
        train_s, train_tokens = 0.0, 0
        for batches in steps:
            t0 = time.perf_counter()
            stats = train_step(run, batches)
            train_s += time.perf_counter() - t0
            train_tokens += stats.target_tokens
        evaluate_run(run, args.steps)  # warm-up
        t0 = time.perf_counter()
        res = evaluate_run(run, args.steps)
        eval_s = time.perf_counter() - t0
        run.tracker.close()
        run.logger.close()
        if run.lock is not None:
            run.lock.release()
        train_rate, eval_rate = 1000 * train_s / train_tokens, 1000 * eval_s / res.tokens
        print(f"train: {train_tokens} target tokens in {train_s:.2f}s ({train_rate:.3f} s/1k tokens); "
              f"eval: {res.tokens} target tokens in {eval_s:.2f}s ({eval_rate:.3f} s/1k tokens); "
              f"eval/train per token: {eval_rate / train_rate:.2f}")
        distributed.shutdown(info)


if __name__ == "__main__":
    main()
