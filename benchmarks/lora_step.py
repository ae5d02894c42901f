"""A LoRA step vs a full fine-tuning step on the same model and batch (CPU, one process, fp32).

    python benchmarks/lora_step.py [--hidden 512] [--layers 4] [--seq 256] [--batch 4] [--steps 5] [--rank 16]

Builds a random Llama-shaped model through build_sharded_model (a world of one), once with
finetune.method=full and once with lora on all linear layers, and times forward + backward + optimizer
step with the trainer's own train_step. A LoRA step still back-propagates through the frozen weights to
their inputs, but skips their weight gradients, their reduction and their optimizer update. Prints one
line per method: median step time, trainable parameters, optimizer state elements.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def run(method: str, args, tmp: str) -> tuple[float, int, int]:
    from fsdptrain.config.schema import load_config
    from fsdptrain.data import pipeline
    from fsdptrain.data.encode import Example
    from fsdptrain.dist import distributed
    from fsdptrain.trainer import setup, train_step

    overrides = [f"output_dir={tmp}/{method}", "parallel.device=cpu", "parallel.precision=fp32",
                 "logging.tensorboard=false", "logging.progress=none", "memory.track_peak=false",
                 "checkpoint.save_at_end=false", f"train.micro_batch_size={args.batch}",
                 f"data.max_length={args.seq}", f"train.max_steps={args.steps + 1}",
                 f"model.hf_config={{model_type: llama, hidden_size: {args.hidden}, intermediate_size: "
                 f"{4 * args.hidden}, num_hidden_layers: {args.layers}, num_attention_heads: 8, "
                 "num_key_value_heads: 4, vocab_size: 256}"]
    if method == "lora":
        overrides += ["finetune.method=lora", f"finetune.lora.rank={args.rank}", "finetune.lora.target=all"]
    cfg = load_config(None, overrides)
    g = torch.Generator().manual_seed(0)
    examples = [Example(ids := torch.randint(0, 256, (args.seq,), generator=g).tolist(), ids)
                for _ in range(args.batch * (args.steps + 2))]
    info = distributed.init("cpu")
    try:
        r = setup(cfg, info, examples)
        batch = next(iter(pipeline.batches(cfg, r.sampler, r.examples, r.tokenizer.pad_token_id, 0, r.total_steps,
                                           "cpu")))
        times = []
        for _ in range(args.steps + 1):  # the same batch every step; the first step warms up
            t0 = time.perf_counter()
            train_step(r, batch)
            times.append(time.perf_counter() - t0)
        state = sum(v.numel() for st in r.optimizer.state.values() for k, v in st.items()
                    if k in ("exp_avg", "exp_avg_sq"))
        ft = r.sharded.finetune
        if r.lock is not None:
            r.lock.release()
        return statistics.median(times[1:]), ft.n_trainable, state
    finally:
        distributed.shutdown(info)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {m: run(m, args, tmp) for m in ("full", "lora")}
    for m, (t, n, state) in results.items():
        print(f"{m:5s} step {t * 1000:8.1f} ms  trainable {n / 1e6:8.3f}M  optimizer state "
              f"{state / 1e6:8.3f}M elements")
    print(f"lora / full step time: {results['lora'][0] / results['full'][0]:.2f}")


if __name__ == "__main__":
    main()
