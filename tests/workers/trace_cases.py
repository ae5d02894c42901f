"""The real side of the trace-vs-reality check (see test_trace.py): per-phase peaks by category of real tensors.

Usage (under torchrun, gloo): python -m tests.workers.trace_cases SPEC.json
SPEC: {"cases": [{"config": yaml, "shapes": [[[rows, width], ...] per step], "out": dir}, ...]}
Each case builds the model with build_sharded_model (real random init), runs memory.trace.measure_steps on real
micro-batches of those shapes, and writes out/rank{R}.json: the phases (step, phase, total, by_category), the
optimizer state bytes and how many phases differed between the repeats.

Collectives are settled at issue (tests/workers/settled.py), as the fake process group completes them. Settled,
a real run still holds an all-gather buffer into one backward phase now and
then (about one run in five under pytest, cause not found: not the gloo thread, not Python's collector), and a
few bytes of scalars into an optimizer phase: each case runs its steps three times on the same model and
reports, per phase, the repeat that held least (a held-over buffer only ever adds).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from fsdptrain.config.schema import load_config
from fsdptrain.dist import distributed
from fsdptrain.memory import trace
from fsdptrain.objectives.loss import install_chunked_loss
from fsdptrain.train.build import build_sharded_model
from fsdptrain.train.optim import build_optimizer
from tests.workers import finish
from tests.workers.settled import settled_collectives

REPEATS = 3


def run_case(case: dict, info: distributed.DistInfo) -> None:
    cfg = load_config(case["config"], [])
    hf = trace.load_hf_config(cfg)
    sharded = build_sharded_model(cfg, info, hf)
    head = install_chunked_loss(sharded.model, cfg.train.loss_chunk_tokens)
    g = torch.Generator().manual_seed(info.rank)
    steps = [[{"input_ids": torch.randint(0, hf.vocab_size, (r, w), generator=g),
               "labels": torch.randint(0, hf.vocab_size, (r, w), generator=g), "n_tokens": torch.tensor(r * w)}
              for r, w in step] for step in case["shapes"]]
    run = trace.step_run(cfg, info, sharded.model, head)
    sharded.model.train()
    repeats = []
    for _ in range(REPEATS):  # the same steps again, from a fresh optimizer (step 1 has no state yet)
        optimizer = build_optimizer(sharded.model, cfg.train, fused=False)
        repeats.append(trace.measure_steps(sharded.model, optimizer, run, steps, cfg.train.max_grad_norm))
    by_phase = list(zip(*(r.phases for r in repeats)))  # each phase across the repeats
    # per phase, the repeat that held least: a held-over buffer only ever adds
    phases = [min(same, key=lambda p: p.total) for same in by_phase]
    differing = sum(len({p.total for p in same}) > 1 for same in by_phase)
    out = Path(case["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{info.rank}.json").write_text(json.dumps(
        {"phases": [dataclasses.asdict(p) for p in phases], "optimizer_state": repeats[-1].optimizer_state,
         "phases_differing_between_repeats": differing}))


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    settled_collectives()
    info = distributed.init("cpu", 5.0)
    try:
        for case in spec["cases"]:
            run_case(case, info)
    finally:
        distributed.shutdown(info)


if __name__ == "__main__":
    finish(main)
