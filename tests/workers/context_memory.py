"""The per-rank activation peak with context parallelism off and on, measured on 2 ranks under torchrun
(tests/test_context_parallel_memory.py).

Usage: python -m tests.workers.context_memory SEQ
On the same 2 gloo ranks, a tiny Llama (2 blocks) is built twice, with parallel.context_parallel 1 (two data ranks, each
holding a whole row of SEQ tokens) and 2 (one context group: each rank holds half of the same row), and two
optimizer steps run under memory.phases.PhaseTracker (torch's FSDPMemTracker on the real tensors, the categories
`fsdptrain estimate --trace` and memory.breakdown_steps report). Rank 0 prints one line per N:
`cp N measured <largest 'activations' of any rank> saved <estimate's activations line> logits <estimate's
logits + loss (forward) line>`.
"""

from __future__ import annotations

import sys

import torch

from fsdptrain.config.schema import load_config
from fsdptrain.data.encode import IGNORE, Example
from fsdptrain.data.loader import collate, context_chunk
from fsdptrain.dist import context, distributed
from fsdptrain.memory import estimate, trace
from fsdptrain.model import ulysses
from fsdptrain.objectives.loss import install_chunked_loss
from fsdptrain.train.build import build_sharded_model
from fsdptrain.train.optim import build_optimizer
from tests.workers import finish

MODEL = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 2,
         "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 4096, "vocab_size": 128}


def row(seq: int, i: int) -> Example:
    ids = [(7 * i + k) % 120 + 4 for k in range(seq)]
    return Example(ids, [IGNORE] + ids[1:])


def measure(info, n: int, seq: int) -> tuple[int, int, int]:
    cfg = load_config(None, ["parallel.device=cpu", "parallel.precision=fp32", "model.attn_implementation=sdpa",
                             f"data.max_length={seq}", "train.micro_batch_size=1",
                             f"parallel.context_parallel={n}"])
    cfg.model.hf_config = dict(MODEL)
    lay = context.layout(n, info.world_size, info.rank)
    ulysses.use_group(context.build_group(lay), n)
    try:
        sharded = build_sharded_model(cfg, info, trace.load_hf_config(cfg))
        head = install_chunked_loss(sharded.model, 0)
        optimizer = build_optimizer(sharded.model, cfg.train, fused=False)
        steps = []
        for step in range(2):  # each data rank its own row; a context group the same row, cut
            batch = collate([row(seq, 2 * step + lay.data_rank)], pad_id=0)
            steps.append([context_chunk(batch, [seq], n, lay.index) if n > 1 else batch])
        run = trace.step_run(cfg, info, sharded.model, head)
        sharded.model.train()
        tr = trace.measure_steps(sharded.model, optimizer, run, steps, cfg.train.max_grad_norm)
    finally:
        ulysses.use_group(None, 1)
    peak = torch.tensor([float(tr.category_max("activations"))], dtype=torch.float64)
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    est = estimate.estimate(cfg, 1, info.world_size, 80 << 30)
    return int(peak.item()), est.terms["activations (saved for backward)"], est.terms["logits + loss (forward)"]


def main() -> None:
    seq = int(sys.argv[1])
    info = distributed.init("cpu")
    try:
        for n in (1, 2):
            measured, saved, logits = measure(info, n, seq)
            if info.rank == 0:
                print(f"cp {n} measured {measured} saved {saved} logits {logits}", flush=True)
    finally:
        distributed.shutdown(info)


if __name__ == "__main__":
    finish(main)
