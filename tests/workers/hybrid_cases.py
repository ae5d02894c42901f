"""Hybrid-sharding cases for one 4-rank launch (tests/test_hybrid.py).

Usage (under torchrun): python -m tests.workers.hybrid_cases SPEC.json
SPEC: {"cases": [{"config": yaml path, "examples": null | "uneven"}],
       "layout_yaml": config whose model is built and sharded without training,
       "layout_dir": folder for rank<R>.safetensors (this rank's local shards) and rank<R>.json (mesh)}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fsdptrain.config.schema import load_config
from fsdptrain.dist import distributed
from fsdptrain.model import models
from fsdptrain.train.build import build_sharded_model
from fsdptrain.trainer import train
from tests.parity_data import uneven_examples
from tests.workers import finish


def dump_layout(config: str, out: Path, info: distributed.DistInfo) -> None:
    from safetensors.torch import save_file

    cfg = load_config(config)
    hf = models.load_hf_config(cfg.model.path, cfg.model.hf_config, None, False)
    sharded = build_sharded_model(cfg, info, hf)
    model, mesh = sharded.model, sharded.mesh
    local = {n: p.to_local().contiguous().clone() for n, p in model.named_parameters()}
    save_file(local, str(out / f"rank{info.rank}.safetensors"))
    first = next(iter(model.parameters()))
    (out / f"rank{info.rank}.json").write_text(json.dumps({
        "mesh_shape": list(mesh.shape), "mesh_dims": list(mesh.mesh_dim_names),
        "placements": [str(p) for p in first.placements],
        "coordinate": mesh.get_coordinate(),
    }))


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    info = distributed.init("cpu")
    for case in spec["cases"]:
        examples = uneven_examples() if case.get("examples") == "uneven" else None
        train(load_config(case["config"]), examples=examples)
    if spec.get("layout_yaml"):
        dump_layout(spec["layout_yaml"], Path(spec["layout_dir"]), info)
    distributed.barrier()
    distributed.shutdown(info)  # closes the peer watchdog first: a tick in flight at exit aborts the process


if __name__ == "__main__":
    finish(main)
