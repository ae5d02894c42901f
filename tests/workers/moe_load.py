"""Load a MoE model folder on every rank and gather the full parameters into a safetensors file (rank 0 writes).

Usage (under torchrun): python -m tests.workers.moe_load CONFIG.yaml OUT.safetensors
"""

from __future__ import annotations

import sys

from fsdptrain import distributed, models
from fsdptrain.build import build_sharded_model
from fsdptrain.config import load_config


def main() -> None:
    cfg = load_config(sys.argv[1])
    info = distributed.init("cpu")
    try:
        hf = models.load_hf_config(cfg.model.path, None, None, False)
        model = build_sharded_model(cfg, info, hf).model
        local_experts = {n: tuple(p.to_local().shape) for n, p in model.named_parameters() if "experts" in n}
        full = {n: p.full_tensor().contiguous() for n, p in model.named_parameters()}
        print(f"rank {info.rank} local expert shards: {sorted(set(local_experts.values()))}", flush=True)
        if info.is_main:
            from safetensors.torch import save_file

            save_file(full, sys.argv[2])
        distributed.barrier()
    finally:
        distributed.shutdown(info)


if __name__ == "__main__":
    main()
