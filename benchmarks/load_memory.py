"""Peak CPU memory per rank while loading pretrained safetensors into a sharded model.

    python benchmarks/load_memory.py [--size 254m|1.1b] [--workdir DIR] [--nproc 2]

Writes (once) a Llama-shaped model folder with random fp32 weights (two
safetensors shards + index; 254M parameters ~1 GB by default), then launches `torchrun --nproc-per-node
N` workers that do what the trainer does: build the model on the meta device,
`fully_shard` it, and fill the local shards with `models.materialize` (each
rank reads only its own rows through safetensors `get_slice`). Each rank
reports its resident memory (VmRSS) before the load and its high-water mark
(VmHWM, reset just before the load) during it. Rank 0 prints the table.

The target: every rank's load costs less than 0.6 x the full state dict.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BASE = {"model_type": "llama", "vocab_size": 32000, "max_position_embeddings": 2048, "tie_word_embeddings": False}
SIZES = {  # Llama shapes: (hidden, intermediate, layers, heads, kv heads)
    "254m": (1024, 2816, 16, 16, 8),
    "1.1b": (2048, 5632, 20, 16, 8),
}


def arch(size: str) -> dict:
    h, i, n, a, kv = SIZES[size]
    return {**BASE, "hidden_size": h, "intermediate_size": i, "num_hidden_layers": n, "num_attention_heads": a,
            "num_key_value_heads": kv}


def make_model(folder: Path, size: str) -> None:
    """Random fp32 weights of the given size, written shard by shard so this process never holds all of them."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    if (folder / "model.safetensors.index.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    fields = arch(size)
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    names = list(shapes)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map, total = {}, 0
    g = torch.Generator().manual_seed(0)
    for i, keys in enumerate(halves):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        part = {}
        for k in keys:
            t = torch.randn(shapes[k], generator=g) * 0.02 if len(shapes[k]) > 1 else torch.ones(shapes[k])
            part[k] = t
            total += t.numel() * 4
            weight_map[k] = name
        save_file(part, str(folder / name), metadata={"format": "pt"})
        del part
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg.save_pretrained(str(folder))


def worker(folder: str, out: str) -> None:
    import torch

    from fsdptrain.config.schema import Config, ModelConfig, ParallelConfig
    from fsdptrain.dist import distributed
    from fsdptrain.memory import stats
    from fsdptrain.model import models
    from fsdptrain.train.build import build_sharded_model

    info = distributed.init("cpu")
    hf = models.load_hf_config(folder, None, None, False)
    cfg = Config(model=ModelConfig(path=folder), parallel=ParallelConfig(device="cpu"), seed=0)
    cpu = torch.device("cpu")
    before = stats.current_bytes(cpu)
    stats.reset_peak(cpu)
    model = build_sharded_model(cfg, info, hf).model  # meta build and sharding allocate nothing
    peak = stats.peak_bytes(cpu)
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    row = torch.tensor([before, peak, local], dtype=torch.float64)
    rows = distributed.all_gather_rows(row, info.world_size)
    if info.is_main:
        Path(out).write_text(json.dumps(rows.tolist()))
    distributed.shutdown(info)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/fsdptrain-load-memory")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--size", choices=list(SIZES), default="254m", help="model shape (fp32 file: ~1 GB or ~4.3 GB)")
    ap.add_argument("--worker", nargs=2, metavar=("FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    folder = Path(args.workdir) / f"model-{args.size}"
    make_model(folder, args.size)
    total = json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    out = Path(args.workdir) / "rows.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
           __file__, "--worker", str(folder), str(out)]
    subprocess.run(cmd, check=True, env=env)
    rows = json.loads(out.read_text())
    gib = 2**30
    print(f"\nmodel: {total / 4 / 1e6:.0f}M params, full fp32 state dict {total / gib:.2f} GiB, "
          f"{args.nproc} CPU ranks\n")
    print("| rank | RSS before load (GiB) | peak RSS during load (GiB) | peak / full state dict "
          "| load cost = peak - before (GiB) | load cost / full state dict | local shard (GiB) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    worst = 0.0
    for r, (before, peak, local) in enumerate(rows):
        cost = peak - before
        worst = max(worst, cost / total)
        print(f"| {r} | {before / gib:.2f} | {peak / gib:.2f} | {peak / total:.2f} | {cost / gib:.2f} "
              f"| {cost / total:.2f} | {local / gib:.2f} |")
    print(f"\nworst rank: load cost {worst:.2f} x the full state dict (target < 0.60): "
          f"{'OK' if worst < 0.6 else 'ABOVE TARGET'}")


if __name__ == "__main__":
    main()
