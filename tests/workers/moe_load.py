"""Load a MoE model folder on every rank and gather the full parameters into a safetensors file (rank 0 writes);
then, with SPEC.json, the MoE training cases of the same launch.

Usage (under torchrun): python -m tests.workers.moe_load CONFIG.yaml OUT.safetensors [SPEC.json]
SPEC: {"routing": {"config": yaml, "examples": [[input_ids, labels], ...], "out": json},
          one training step; rank 0 writes the step's routed-token counts (all ranks) and every rank's batches
       "model_state": [{"config": yaml, "out": dir}, ...]}  real shard sizes, out/rank{R}.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from fsdptrain import distributed, models
from fsdptrain.build import build_sharded_model
from fsdptrain.config import load_config


def load_case(config: str, out: str, info: distributed.DistInfo) -> None:
    cfg = load_config(config)
    hf = models.load_hf_config(cfg.model.path, None, None, False)
    model = build_sharded_model(cfg, info, hf).model
    local_experts = {n: tuple(p.to_local().shape) for n, p in model.named_parameters() if "experts" in n}
    full = {n: p.full_tensor().contiguous() for n, p in model.named_parameters()}
    print(f"rank {info.rank} local expert shards: {sorted(set(local_experts.values()))}", flush=True)
    if info.is_main:
        from safetensors.torch import save_file

        save_file(full, out)
    distributed.barrier()


def routing_case(spec: dict, info: distributed.DistInfo) -> None:
    """trainer.train for one step; the counts the trainer summarised and the batches each rank ran are kept."""
    from fsdptrain import moe, trainer
    from fsdptrain.data.encode import Example

    counts, batches = [], []
    real_take, real_step = moe.take_counts, trainer.train_step

    def take(load):
        counts.append(real_take(load))
        return counts[-1]

    def step(run, b, t0=None):
        batches.append([x["input_ids"].tolist() for x in b])
        return real_step(run, b, t0)

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
        load_case(sys.argv[1], sys.argv[2], info)
        spec = json.loads(Path(sys.argv[3]).read_text()) if len(sys.argv) > 3 else {}
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
    main()
