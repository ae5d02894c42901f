"""The family matrix's one launch: every family trained 3 steps on this process group through the trainer.

Usage (under torchrun): python -m tests.workers.family_matrix SPEC.json
SPEC: {"cases": [{"name", "folder", "attn", "out", "checkpoint": save one after the last step}],
       "examples": [[token ids], ...], "probe": [[token ids], ...], "max_steps": int, "train": {key: value}}
Per case, rank 0 writes into case["out"]: loaded.safetensors (every parameter and buffer, full, right after
loading), trained.safetensors (the state dict after training, in transformers' in-memory names), probe.safetensors
(the trained model's logits on the probe batch), result.json (step losses, the packing verdict: packed and
unpacked summed losses of the loaded model, or the refusal line; per rank, the local shape of every expert
parameter). The run directory is case["out"]/run (its
checkpoint and the training-end export, run/hf). A case that fails at start-up with a UserError is recorded as
that one line in result.json and the next case runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from fsdptrain.config.schema import load_config
from fsdptrain.core.errors import UserError
from fsdptrain.data.encode import Example
from fsdptrain.data.loader import collate
from fsdptrain.data.packing import pack
from fsdptrain.dist import distributed
from fsdptrain.model import packcheck
from fsdptrain.objectives.loss import token_loss_sum
from fsdptrain.trainer import loop, setup
from tests.workers import finish


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t.detach()).clone().contiguous()


def save(tensors: dict, path: Path, info: distributed.DistInfo) -> None:
    if info.is_main:
        from safetensors.torch import save_file

        save_file(tensors, str(path))


def packing_verdict(run, examples: list[Example]) -> dict:
    """The product's packing check for this model; where it allows packing, the loaded model's summed loss of two
    examples packed in one row (the loader's collate) and of the same examples unpacked."""
    try:
        packcheck.check_packing(run.hf_config, run.cfg.model.attn_implementation)
    except UserError as e:
        return {"refused": str(e)}
    two = [Example(e.input_ids[:n], e.labels[:n]) for e, n in zip(examples[:2], (9, 7))]
    row = pack(two, [9, 7], 16)
    assert len(row) == 1
    pad = run.tokenizer.pad_token_id
    run.model.eval()
    with torch.no_grad():
        packed = token_loss_sum(run.model, collate([row[0]], pad)).item()
        alone = token_loss_sum(run.model, collate(two, pad)).item()
    run.model.train()
    return {"packed": packed, "unpacked": alone}


def run_case(case: dict, spec: dict, info: distributed.DistInfo) -> None:
    out = Path(case["out"])
    examples = [Example(list(ids), list(ids)) for ids in spec["examples"]]
    cfg = load_config(None, [
        f"model.path={case['folder']}", f"model.attn_implementation={case['attn']}", f"output_dir={out / 'run'}",
        "parallel.device=cpu", "parallel.precision=fp32", "seed=7",
        f"train.max_steps={spec['max_steps']}", f"train.micro_batch_size={len(examples) // info.world_size}",
        "train.grad_accum_steps=1", *(f"train.{k}={v}" for k, v in spec["train"].items()),
        "checkpoint.export_hf=true", f"checkpoint.save_at_end={str(case['checkpoint']).lower()}",
        "logging.progress=none", "logging.tensorboard=false", "logging.log_every=1"])
    try:
        run = setup(cfg, info, examples)
    except UserError as e:  # a family that cannot work: refused at start-up, in one line
        if info.is_main:
            (out / "result.json").write_text(json.dumps({"refused_at_start": str(e)}))
        return
    try:
        state = {k: full(v) for k, v in run.model.named_parameters()}
        state.update({f"buffer.{k}": full(v) for k, v in run.model.named_buffers()})
        save(state, out / "loaded.safetensors", info)
        local = {k: list(v.to_local().shape) for k, v in run.model.named_parameters() if ".experts." in k}
        held = [None] * info.world_size
        torch.distributed.all_gather_object(held, local)  # which expert rows each rank holds (and so read)
        result = {"packing": packing_verdict(run, examples), "local_experts": held}
        result["losses"] = loop(run).losses
        trained = {k: full(v) for k, v in run.model.state_dict().items()}
        save(trained, out / "trained.safetensors", info)
        run.model.eval()
        with torch.no_grad():
            logits = run.model(input_ids=torch.tensor(spec["probe"]), use_cache=False).logits
        save({"logits": logits.contiguous()}, out / "probe.safetensors", info)
        if info.is_main:
            (out / "result.json").write_text(json.dumps(result))
    finally:
        if run.lock is not None:
            run.lock.release()


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    info = distributed.init("cpu")
    try:
        for case in spec["cases"]:
            Path(case["out"]).mkdir(parents=True, exist_ok=True)
            run_case(case, spec, info)
            distributed.barrier()
    finally:
        distributed.shutdown(info)


if __name__ == "__main__":
    finish(main)
