"""Data pipeline throughput: tokenising and packing generated alpaca-style records.

Writes N generated alpaca records (instruction / optional input / output, a few
dozen words each) to a JSON file, then for each num_proc runs the real cache
build (read, convert, chat-template tokenisation with label masks via
datasets.map, save) into a fresh cache folder, and packs the result into
fixed-length rows (bin packing plus materialising every row). Prints a table of
examples/s and tokens/s, then how full and how even token-budget micro-batches
are on the same lengths. Uses the built-in character tokenizer (no hub here),
so tokens are characters: a subword tokenizer gives fewer tokens per record.

    python benchmarks/data_throughput.py [--records 100000] [--num-proc 1 2] [--pack-length 2048]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from fsdptrain.data import cache
from fsdptrain.data.loader import StepSampler, padded
from fsdptrain.data.packing import pack
from fsdptrain.data.sources import resolve
from fsdptrain.data.tokenizer import build_char_tokenizer

WORDS = ("the model data train token batch rank shard memory layer loss step learn value small large "
         "fast slow write read check answer question explain list give short long simple").split()


def generate(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [{"instruction": words(5, 20).capitalize() + "?", "input": words(0, 15) if rng.random() < 0.4 else "",
             "output": words(10, 80).capitalize() + "."} for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--pack-length", type=int, default=2048)
    ap.add_argument("--token-budget", type=int, default=16384)
    args = ap.parse_args()

    tok = build_char_tokenizer()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "gen.json").write_text(json.dumps(generate(args.records)))
        (root / "dataset_info.json").write_text(json.dumps({"gen": {"file_name": "gen.json"}}))
        specs = resolve(["gen"], str(root))
        for n in args.num_proc:
            s = cache.Settings(args.max_length, False, False, None, 0, num_proc=n)
            t0 = time.perf_counter()
            examples, st, _, hit = cache.prepare(specs, tok, s, root / f"cache{n}", 0, 0, True, lambda m: None)
            dt = time.perf_counter() - t0
            tokens = int(examples.lengths.sum())
            rows.append((f"tokenise (num_proc {n})", len(examples), tokens, dt))
        t0 = time.perf_counter()
        packed = pack(examples, examples.lengths, args.pack_length)
        plan = time.perf_counter() - t0
        for i in range(len(packed)):
            packed[i]
        dt = time.perf_counter() - t0
        fill = tokens / (len(packed) * args.pack_length)
        lengths = examples.lengths.copy()
        rows.append((f"pack into {args.pack_length}-token rows (plan {plan:.2f} s)", len(examples), tokens, dt))

    print(f"{args.records} generated alpaca records, built-in character tokenizer, cutoff {args.max_length}; "
          f"{len(packed)} packed rows, {100 * fill:.1f}% filled\n")
    print("| stage | examples | tokens | seconds | examples/s | tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, n, tk, dt in rows:
        print(f"| {name} | {n:,} | {tk:,} | {dt:.1f} | {n / dt:,.0f} | {tk / dt:,.0f} |")
    balance(lengths, args.token_budget)


def balance(lengths, budget: int, steps: int = 200) -> None:
    """Token-budget batching on these lengths: how full micro-batches are and how even ranks are per step."""
    print(f"\ntoken budget {budget}, 2 micro-steps per step, first {steps} steps\n")
    print("| ranks | real tokens / budget | padded tokens / budget | min/max real tokens across ranks (mean, worst) |")
    print("| ---: | ---: | ---: | ---: |")
    for world in (2, 8):
        samplers = [StepSampler(len(lengths), world, r, 1, 2, seed=0, token_budget=budget, lengths=lengths)
                    for r in range(world)]
        real, pad, ratios = [], [], []
        for step in range(min(steps, samplers[0].steps_per_epoch)):
            per_rank = []
            for s in samplers:
                mbs = s.rank_micro_batches(step)
                real += [sum(int(lengths[i]) for i in mb) / budget for mb in mbs]
                pad += [padded(max(int(lengths[i]) for i in mb)) * len(mb) / budget for mb in mbs]
                per_rank.append(sum(int(lengths[i]) for mb in mbs for i in mb))
            ratios.append(min(per_rank) / max(per_rank))
        print(f"| {world} | {sum(real) / len(real):.3f} | {sum(pad) / len(pad):.3f} | "
              f"{sum(ratios) / len(ratios):.3f}, {min(ratios):.3f} |")


if __name__ == "__main__":
    main()
