"""LoRA / freeze cases in one launched process group (tests/test_finetune.py).

Usage (under torchrun): python -m tests.workers.lora_cases SPEC.json
SPEC: {"cases": [{"config": yaml path, "kind": "train" | "steps" | "refuse" | "probe", ...}], "ids": [token ids]}
  train: trainer.setup + loop; with logits_out, rank 0 saves the trained model's logits on `ids` (safetensors).
  steps: trainer.setup (resuming if configured), then only the next `steps` optimizer steps of the configured run
         (its schedule unchanged, nothing saved); rank 0 writes {"step", "loss", "grad_norm"} lists to `out`,
         with the optimizer's class, the mesh shape and which blocks were compiled.
  refuse: setup must fail with a UserError; rank 0 writes its message to error_out.
  eval: `fsdptrain eval` of `source` (a run directory or checkpoint) on the config's eval data; rank 0 writes the
        result JSON to `out`.
  probe: one forward/backward and optimizer step; rank 0 writes PROBE.json into output_dir: which frozen
         tensors got a gradient, trainable parameters, optimizer state elements, local bytes per dtype (all ranks);
         each rank writes PROBE-rank{R}.json: its shards' storage bytes (parameters, gradients, optimizer state).
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from fsdptrain import evalrun, trainer
from fsdptrain.config.schema import load_config
from fsdptrain.core.errors import UserError
from fsdptrain.data import pipeline
from fsdptrain.dist import distributed
from fsdptrain.model.models import local_tensor
from tests.workers import finish


def run_train(cfg, info, ids: list[int], logits_out: str | None) -> None:
    run = trainer.setup(cfg, info)
    try:
        trainer.loop(run)
        if logits_out:
            run.model.eval()
            with torch.no_grad():
                logits = run.model(input_ids=torch.tensor([ids]), use_cache=False).logits
            if info.is_main:
                from safetensors.torch import save_file

                save_file({"logits": logits.contiguous()}, logits_out)
    finally:
        if run.lock is not None:
            run.lock.release()


def run_steps(cfg, info, n: int, out: str) -> None:
    run = trainer.setup(cfg, info)
    try:
        got: dict[str, list] = {"step": [], "loss": [], "grad_norm": []}
        start = run.state.step
        run.model.train()
        for batches in pipeline.batches(cfg, run.sampler, run.examples, run.tokenizer.pad_token_id, start,
                                        min(start + n, run.total_steps), "cpu"):
            stats = trainer.train_step(run, batches)
            for key in got:
                got[key].append(getattr(stats, key))
        if info.is_main:  # and what ran: the optimizer's class, the mesh, whether the blocks were compiled
            Path(out).write_text(json.dumps({**got, "optimizer": type(run.optimizer).__name__,
                                             "mesh": list(run.sharded.mesh.shape),
                                             "compiled": [b._compiled_call_impl is not None
                                                          for b in run.sharded.blocks]}))
    finally:
        if run.lock is not None:
            run.lock.release()


def sum_all(values: dict[str, int]) -> dict[str, int]:
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    distributed.all_reduce_sum(t)
    return {k: int(v) for k, v in zip(keys, t.tolist())}


def storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (FSDP2's padded shards)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def probe(cfg, info, out: Path) -> None:
    run = trainer.setup(cfg, info)
    try:
        batches = next(iter(pipeline.batches(cfg, run.sampler, run.examples, run.tokenizer.pad_token_id, 0,
                                             run.total_steps, "cpu")))
        trainer.forward_backward(run, batches, torch.tensor(1.0))
        params = list({id(p): (n, p) for n, p in run.model.named_parameters()}.values())
        frozen_with_grad = [n for n, p in params if not p.requires_grad and p.grad is not None]
        trainable_without_grad = [n for n, p in params if p.requires_grad and p.grad is None]
        grads = [local_tensor(p.grad) for _, p in params if p.grad is not None]
        run.optimizer.step()
        own = {"params_storage": storage_bytes([local_tensor(p) for _, p in params]),
               "grads_storage": storage_bytes(grads), "n_tensors": len(params),
               "optimizer_bytes": sum(local_tensor(v).numel() * v.element_size() for st in run.optimizer.state.values()
                                      for v in st.values() if isinstance(v, torch.Tensor))}
        (out / f"PROBE-rank{info.rank}.json").write_text(json.dumps(own))
        state = sum(v.numel() if not hasattr(v, "to_local") else v.to_local().numel()
                    for st in run.optimizer.state.values() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq"))
        by_dtype: Counter = Counter()
        for _n, p in params:
            t = local_tensor(p)
            by_dtype[f"{'trainable' if p.requires_grad else 'frozen'}.{str(t.dtype).removeprefix('torch.')}"] += \
                t.numel() * t.element_size()
        counts = sum_all({"optimizer_state_elements": state, **by_dtype})
        if info.is_main:
            ft = run.sharded.finetune
            (out / "PROBE.json").write_text(json.dumps({
                **counts, "frozen_with_grad": frozen_with_grad, "trainable_without_grad": trainable_without_grad,
                "n_trainable": ft.n_trainable, "trainable": ft.trainable,
                "optimizer_params": sum(len(g["params"]) for g in run.optimizer.param_groups)}))
    finally:
        if run.lock is not None:
            run.lock.release()


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    info = distributed.init("cpu")
    for case in spec["cases"]:
        t0, c0 = time.perf_counter(), time.process_time()
        cfg = load_config(case["config"])
        if case.get("kind") == "probe":
            probe(cfg, info, Path(cfg.output_dir))
        elif case.get("kind") == "steps":
            run_steps(cfg, info, case["steps"], case["out"])
        elif case.get("kind") == "eval":
            evalrun.eval_checkpoint(cfg, case["source"], case["out"])
        elif case.get("kind") == "refuse":  # a start that must fail with one line: record it
            try:
                trainer.setup(cfg, info)
                msg = "started"
            except UserError as e:
                msg = str(e)
            if info.is_main:
                Path(case["error_out"]).write_text(msg)
        else:
            run_train(cfg, info, spec.get("ids", []), case.get("logits_out"))
        distributed.barrier()
        if info.is_main:  # where a launch's seconds go (the test budget)
            print(f"case {Path(case['config']).stem}: {time.perf_counter() - t0:.1f} s "
                  f"({time.process_time() - c0:.1f} s CPU on rank 0)", flush=True)
    distributed.shutdown(info)  # closes the peer watchdog first: a tick in flight at exit aborts the process


if __name__ == "__main__":
    finish(main)
