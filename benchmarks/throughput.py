"""Throughput of the fsdptrain loop next to a minimal hand-written FSDP2 loop, same model and data, one run.

    python benchmarks/throughput.py                       # CPU: the demo model, fixed-length batches
    python benchmarks/throughput.py --preset llama-1b     # GPU: the Llama-3.2-1B shape, 4 x 4096, bf16
    python benchmarks/throughput.py --config my.yaml --seq 2048 --micro-batch 2

Both loops see identical batches (random tokens, every position a target) and
are timed over the same steps after warm-up, wall clock including everything
each loop does per step (fsdptrain: token all_reduce, loss gather, clipping,
metrics writing with log_every=1). Prints tokens/s per device, step time, peak
memory, MFU on CUDA and the ratio fsdptrain / hand loop.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from fsdptrain.config.schema import Config, load_config
from fsdptrain.data.encode import Example
from fsdptrain.data.loader import StepSampler, collate
from fsdptrain.dist import distributed
from fsdptrain.dist.plan import resolve_precision
from fsdptrain.memory import stats as memstats
from fsdptrain.model import models
from fsdptrain.run.metrics import peak_tflops
from fsdptrain.train.parallelize import mixed_precision_policy
from fsdptrain.trainer import train

LLAMA_1B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
            "max_position_embeddings": 8192, "tie_word_embeddings": True, "rope_theta": 500000.0}


def fixed_length_examples(n: int, seq: int, vocab: int, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, vocab, (seq,), generator=g).tolist()
        out.append(Example(ids, list(ids)))
    return out


def hand_loop(cfg: Config, examples: list[Example], steps: int, info: distributed.DistInfo) -> tuple[list[float], int]:
    """The smallest correct FSDP2 loop: meta init, fully_shard blocks + root, AdamW, mean CE."""
    from torch.distributed.fsdp import fully_shard

    precision = resolve_precision(cfg.parallel.precision, info.device_type)
    hf = models.load_hf_config(None, cfg.model.hf_config, None, False)
    model = models.build_meta_model(hf, cfg.model.attn_implementation, models.DTYPES[precision], False)
    mesh = init_device_mesh(info.device_type, (info.world_size,), mesh_dim_names=("dp",))
    mp = mixed_precision_policy(precision)
    for block in models.find_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device=info.device)
    models.restore_buffers(model)
    models.init_random(model, cfg.seed)
    fast = {"fused": True} if info.device_type == "cuda" else {"foreach": True}  # the fast path on each device
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, **fast)
    sampler = StepSampler(len(examples), info.world_size, info.rank, cfg.train.micro_batch_size, 1, cfg.seed)
    stamps = []
    memstats.reset_peak(info.device)
    for step in range(steps):
        (ids,) = sampler.rank_micro_batches(step)
        b = collate([examples[i] for i in ids], 0)
        x, y = b["input_ids"].to(info.device), b["labels"].to(info.device)
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # what any loop that logs its loss pays
        stamps.append(time.perf_counter())
    return stamps, memstats.peak_bytes(info.device)


def elapsed_per_step(out_dir: str, result, info) -> list[tuple[int, float]]:
    """(step, wall-clock stamp) pairs, logging included (rank 0's metrics.jsonl); other ranks: their step times."""
    if info.is_main:
        lines = Path(out_dir, "metrics.jsonl").read_text().splitlines()
        return [(m["step"], m["elapsed_s"]) for m in map(json.loads, lines)]
    out, t = [], 0.0
    for i, dt in enumerate(result.step_times):
        t += dt
        out.append((i + 1, t))
    return out


def per_step(stamps: list, warmup: int) -> float:
    """Median seconds per step after `warmup` steps; stamps are times, or (step, time) pairs when not every step
    logs."""
    pairs = [s if isinstance(s, tuple) else (i + 1, s) for i, s in enumerate(stamps)]
    pairs = [p for p in pairs if p[0] > warmup]
    return statistics.median((t2 - t1) / (s2 - s1) for (s1, t1), (s2, t2) in zip(pairs, pairs[1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="fsdptrain YAML (model.hf_config is used); default: the built-in demo model")
    ap.add_argument("--preset", choices=["demo", "llama-1b"], default="demo")
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=4, help="alternate the two loops this many times (ABBA); best kept")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=K=V,K=V",
                    help="also run fsdptrain with these overrides (repeatable), e.g. "
                         "'compile=parallel.compile=true'; the hand loop runs once as the baseline")
    ap.add_argument("overrides", nargs="*", help="key.path=value overrides for the fsdptrain config")
    args = ap.parse_args()

    overrides = ["logging.log_every=1", "logging.progress=none", "logging.tensorboard=false", "train.warmup_steps=0",
                 "checkpoint.save_at_end=false", "checkpoint.resume=none",
                 "train.grad_accum_steps=1", *args.overrides]
    if args.preset == "llama-1b":
        seq, mb, steps = args.seq or 4096, args.micro_batch or 4, args.steps or 11
        overrides += [f"model.hf_config={json.dumps(LLAMA_1B)}", "train.lr=1e-5"]
    else:
        seq, mb, steps = args.seq or 128, args.micro_batch or 8, args.steps or 40
    overrides.insert(0, f"data.max_length={seq}")  # what activation_checkpointing=auto plans for
    cfg = load_config(args.config, [*overrides, f"train.micro_batch_size={mb}", f"train.max_steps={steps}"])
    info = distributed.init(cfg.parallel.device, cfg.parallel.timeout_minutes)
    cfg.model.hf_config.setdefault("vocab_size", 100)  # the built-in tokenizer's size, as train() would set
    vocab = cfg.model.hf_config["vocab_size"]
    examples = fixed_length_examples(mb * info.world_size * (steps + 1), seq, vocab)

    rows: dict[str, list] = {"fsdptrain": [], "hand-written FSDP2": []}
    peaks: dict[str, int] = {}
    hf = models.load_hf_config(None, cfg.model.hf_config, None, False)
    n_params = models.count_params(models.build_meta_model(hf, "sdpa", torch.float32, False))
    tflops = peak_tflops(info.device, cfg.logging.peak_tflops)

    def row(name: str, t: float) -> str:
        tok_s = mb * seq / t
        mfu = f"{models.flops_per_token(hf, n_params, seq) * tok_s / (tflops * 1e12):.1%}" if tflops else "n/a"
        return f"| {name} | {tok_s:,.0f} | {t:.4f} | {peaks[name] / 2**30:.2f} | {mfu} |"

    def done(name: str) -> None:  # one line per finished run, so a run cut short by a timeout still reports
        if info.is_main:
            print(f"row: {row(name, min(rows[name]))}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        def run_fsdptrain(rep: int) -> None:
            cfg.output_dir = f"{tmp}/run{rep}"
            result = train(cfg, examples=examples)
            rows["fsdptrain"].append(per_step(elapsed_per_step(cfg.output_dir, result, info), args.warmup))
            peaks["fsdptrain"] = result.peak_mem_bytes
            done("fsdptrain")

        def run_hand(rep: int) -> None:
            stamps, peak = hand_loop(cfg, examples, steps, info)
            gc.collect()  # the hand loop's FSDP2 model is held by reference cycles (train() frees its own)
            rows["hand-written FSDP2"].append(per_step(stamps, args.warmup))
            peaks["hand-written FSDP2"] = peak
            done("hand-written FSDP2")

        for rep in range(args.repeats):  # ABBA order, so neither loop always runs second
            for fn in ((run_fsdptrain, run_hand) if rep % 2 == 0 else (run_hand, run_fsdptrain)):
                fn(rep)

    for spec in args.variant:  # extra fsdptrain configurations, same batches
        name, _, kv = spec.partition("=")
        vcfg = load_config(args.config, [*overrides, f"train.micro_batch_size={mb}", f"train.max_steps={steps}",
                                         *[x for x in kv.split(",") if x]])
        vcfg.model.hf_config.setdefault("vocab_size", 100)
        with tempfile.TemporaryDirectory() as tmp:
            vcfg.output_dir = f"{tmp}/run"
            try:
                result = train(vcfg, examples=examples)
            except Exception as e:  # one failing variant must not hide the others' numbers
                if info.is_main:
                    print(f"variant {name} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                continue
            elapsed = elapsed_per_step(vcfg.output_dir, result, info)
        rows[f"fsdptrain {name}"] = [per_step(elapsed, args.warmup)]
        peaks[f"fsdptrain {name}"] = result.peak_mem_bytes
        done(f"fsdptrain {name}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    if info.is_main:
        dev = torch.cuda.get_device_name() if info.device_type == "cuda" else "CPU"
        print(f"\nmodel {n_params / 1e6:.1f}M params, micro-batch {mb} x {seq} tokens, {info.world_size} rank(s), "
              f"{dev}, precision {resolve_precision(cfg.parallel.precision, info.device_type)}, "
              f"median of steps {args.warmup + 1}-{steps}, best of {args.repeats}")
        print("| loop | tokens/s/device | step time (s) | peak memory (GiB) | MFU |")
        print("| --- | ---: | ---: | ---: | ---: |")
        best = {}
        for name, times in rows.items():
            best[name] = min(times)
            print(row(name, best[name]))
        ratio = best["hand-written FSDP2"] / best["fsdptrain"]
        print(f"\nfsdptrain throughput / hand-written loop = {ratio:.3f}")
        for name in rows:
            if name.startswith("fsdptrain "):
                print(f"{name} / hand-written loop = {best['hand-written FSDP2'] / min(rows[name]):.3f}")
    distributed.shutdown(info)


if __name__ == "__main__":
    main()
