"""Run several training cases in one launched process group (a 2-rank start costs ~5 s here).

Usage (under torchrun): python -m tests.workers.dist_cases SPEC.json
SPEC: {"cases": [{"name": str, "config": yaml path, "examples": null | "uneven"}],
       "init_out": optional path: gather a random init made on this world size into a safetensors file}
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


def gather_random_init(model_yaml: str, out: str, info: distributed.DistInfo) -> None:
    cfg = load_config(model_yaml)
    hf = models.load_hf_config(None, cfg.model.hf_config, None, False)
    model = build_sharded_model(cfg, info, hf).model
    full = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    buffers = {f"buffer.{n}": b.clone() for n, b in model.named_buffers()}
    if info.is_main:
        from safetensors.torch import save_file

        save_file({**full, **buffers}, out)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    info = distributed.init("cpu")
    for case in spec.get("cases", []):
        cfg = load_config(case["config"])
        examples = uneven_examples() if case.get("examples") == "uneven" else None
        train(cfg, examples=examples)
    if spec.get("init_out"):
        gather_random_init(spec["init_model_yaml"], spec["init_out"], info)
    distributed.barrier()
    distributed.shutdown(info)  # closes the peer watchdog first: a tick in flight at exit aborts the process


if __name__ == "__main__":
    finish(main)
