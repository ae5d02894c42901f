"""The MoE training cases of tests/test_moe_loading.py, in one 2-rank launch (loading itself is checked by the
family matrix).

Usage (under torchrun): python -m tests.workers.moe_load SPEC.json
SPEC: {"routing": {"config": yaml, "examples": [[input_ids, labels], ...], "out": json},
          one training step; rank 0 writes the step's routed-token counts (all ranks) and every rank's batches
       "model_state": [{"config": yaml, "out": dir}, ...]}  real shard sizes, out/rank{R}.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from fsdptrain.config.schema import load_config
from fsdptrain.dist import distributed
from tests.workers import finish


def routing_case(spec: dict, info: distributed.DistInfo) -> None:
    """trainer.train for one step; the counts the trainer summarised and the batches each rank ran are kept."""
    from fsdptrain import trainer
    from fsdptrain.data.encode import Example
    from fsdptrain.model import moe

    counts, batches = [], []
    real_take, real_step = moe.take_counts, trainer.train_step

    def take(load):
        counts.append(real_take(load))
        return counts[-1]

    def step(run, b, *args, **kwargs):
        batches.append([x["input_ids"].tolist() for x in b])
        return real_step(run, b, *args, **kwargs)

    moe.take_counts, trainer.train_step = take, step
    try:
        trainer.train(load_config(spec["config"]), examples=[Example(i, lab) for i, lab in spec["examples"]])
    finally:
        moe.take_counts, trainer.train_step = real_take, real_step
    every = [None] * info.world_size
    dist.all_gather_object(every, batches[0])
    if info.is_main:
        Path(spec["out"]).write_text(json.dumps({"counts": counts[0].tolist(), "batches": every}))


def main() -> None:
    info = distributed.init("cpu")
    try:
        spec = json.loads(Path(sys.argv[1]).read_text())
        if "routing" in spec:
            routing_case(spec["routing"], distributed.init("cpu"))
        for case in spec.get("model_state", []):
            from tests.workers.mem_cases import measure_model_state

            Path(case["out"]).mkdir(parents=True, exist_ok=True)
            (Path(case["out"]) / f"rank{info.rank}.json").write_text(json.dumps(measure_model_state(case["config"],
                                                                                                    info)))
        distributed.barrier()
    finally:
        distributed.shutdown(info)


if __name__ == "__main__":
    finish(main)
