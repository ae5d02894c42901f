"""Training cases for data.balance in one launched process group, with an optional stand-in for a slow GPU.

Usage (under torchrun): python -m tests.workers.balance_cases SPEC.json
SPEC: {"cases": [{"config": yaml path, "seconds_per_token": null | [s_rank0, s_rank1, ...]}]}
seconds_per_token: each block's forward on rank r also sleeps s_r x (rows x width) seconds, inside the compute
time the balance measures (the hook runs after ComputeClock's start), so rank r computes as if that much slower.
Each rank writes the examples it took at each step to OUTPUT_DIR/examples-rank<r>.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from fsdptrain import trainer
from fsdptrain.config.schema import load_config
from fsdptrain.dist import distributed
from fsdptrain.train import balance
from fsdptrain.trainer import train

_begin = balance.ComputeClock._begin
_train_step = trainer.train_step


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    info = distributed.init("cpu")
    for case in spec["cases"]:
        slow = case.get("seconds_per_token")

        def begin(self, module, args, _s=slow[info.rank] if slow else 0.0) -> None:
            _begin(self, module, args)
            time.sleep(_s * args[0].shape[0] * args[0].shape[1])

        balance.ComputeClock._begin = begin
        cfg = load_config(case["config"])
        taken: list[int] = []

        def step(run, batches, *a, _taken=taken, **k):
            _taken.append(sum(int(b["input_ids"].shape[0]) for b in batches))
            return _train_step(run, batches, *a, **k)

        trainer.train_step = step
        train(cfg)
        Path(cfg.output_dir, f"examples-rank{info.rank}.json").write_text(json.dumps(taken))
    distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
