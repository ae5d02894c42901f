"""Evaluation cases in one process group: the eval loss of a model folder under several settings, and training
runs (for the side-effect test and the in-run vs `fsdptrain eval` comparison).

Usage (under torchrun, or plain python for one rank): python -m tests.workers.eval_cases SPEC.json
SPEC: {"out": results json, "eval": [{"name": str, "config": yaml path}], "train": [yaml path, ...]}
Rank 0 writes {"eval": {name: {"loss", "tokens", "examples", "rng_same", "mode_back"}}, "world_size": W}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from fsdptrain.config.schema import load_config
from fsdptrain.data import pipeline
from fsdptrain.data.tokenizer import load_tokenizer
from fsdptrain.dist import distributed
from fsdptrain.model import models
from fsdptrain.objectives.loss import install_chunked_loss
from fsdptrain.objectives.sft import SFT
from fsdptrain.train.build import build_sharded_model
from fsdptrain.train.evaluate import eval_micro_batch, evaluate
from fsdptrain.trainer import train
from tests.workers import finish


def eval_case(config: str, info: distributed.DistInfo) -> dict:
    cfg = load_config(config)
    tok = load_tokenizer(cfg.model.tokenizer, cfg.model.path)
    _, evals = pipeline.load_train_eval(cfg, tok, info.rank, info.local_rank, lambda m: None)
    hf = models.load_hf_config(cfg.model.path, None, len(tok), False)
    model = build_sharded_model(cfg, info, hf).model
    head = install_chunked_loss(model, cfg.train.loss_chunk_tokens)
    model.train()
    rng = torch.get_rng_state()
    res = evaluate(model, SFT, evals, tok.pad_token_id, info.device, info.world_size, info.rank,
                   eval_micro_batch(cfg), cfg.train.eval_max_batches, head)
    return {"loss": res.loss, "tokens": res.tokens, "examples": res.examples, "rows": len(evals),
            "rng_same": bool(torch.equal(rng, torch.get_rng_state())), "mode_back": model.training}


def run(spec: dict) -> dict:
    info = distributed.init("cpu")
    out = {"world_size": info.world_size, "eval": {}}
    for case in spec.get("eval", []):
        out["eval"][case["name"]] = eval_case(case["config"], info)
    for config in spec.get("train", []):
        train(load_config(config))
    distributed.barrier()
    if info.is_main:
        Path(spec["out"]).write_text(json.dumps(out))
    return out


def main() -> None:
    run(json.loads(Path(sys.argv[1]).read_text()))
    watch = distributed.peers()
    if watch is not None:  # the peer watchdog first: a tick in flight at exit aborts the process
        watch.close()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    finish(main)
