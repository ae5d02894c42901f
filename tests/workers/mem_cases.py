"""Memory-feature cases run inside one launched process group (see test_memory.py).

Usage (under torchrun): python -m tests.workers.mem_cases SPEC.json
SPEC: {"train": [config yaml, ...],            runs with imbalanced_examples(world_size)
       "model_state": {"config": yaml, "out": dir},  writes out/rank{R}.json (real shard sizes)
       "oom": {"config": yaml, "rank": R, "at_call": N}}  then rank R raises OutOfMemoryError in its N-th forward
                         (with "in": "ulysses": in its N-th sequence-to-heads exchange of context parallelism,
                         where its context peer waits in the all-to-all)
   or {"watchdog": run_dir}: the peer-failure watchdog alone (2 ranks)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from fsdptrain.config.schema import load_config
from fsdptrain.data.encode import IGNORE, Example
from fsdptrain.dist import distributed
from fsdptrain.model import models
from fsdptrain.train.build import build_sharded_model
from fsdptrain.train.optim import build_optimizer
from tests.workers import finish

LONG, SHORT = 1536, 32


def imbalanced_examples(world: int, n_steps: int = 4) -> list[Example]:
    """With shuffle off and micro-batch 1, the last rank gets a LONG example every step, the others SHORT ones."""
    out = []
    for i in range(n_steps * world):
        n = LONG if i % world == world - 1 else SHORT
        ids = [(5 * i + k) % 90 + 4 for k in range(n)]
        out.append(Example(ids, [IGNORE] * 4 + ids[4:]))
    return out


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def measure_model_state(config: str, info: distributed.DistInfo) -> dict:
    """Real per-rank sizes of the sharded parameters, gradients and AdamW state after one step."""
    cfg = load_config(config)
    hf = models.load_hf_config(None, cfg.model.hf_config, None, False)
    model = build_sharded_model(cfg, info, hf).model
    opt = build_optimizer(model, cfg.train, fused=False)
    ids = torch.arange(24).reshape(2, 12) % hf.vocab_size
    model(input_ids=ids).logits.float().square().mean().backward()
    params = [local_tensor(p) for p in model.parameters()]
    grads = [local_tensor(p.grad) for p in model.parameters()]
    out = {"rank": info.rank, "world": info.world_size,
           "params_local": sum(t.numel() for t in params), "params_storage": _storage_bytes(params),
           "grads_local": sum(t.numel() for t in grads), "grads_storage": _storage_bytes(grads),
           "n_tensors": len(params),
           # per parameter: its padded shard's own storage, its gradient's unpadded shard (what cpu_offload pins)
           "param_storages": [t.untyped_storage().nbytes() for t in params],
           "grad_bytes": [t.numel() * t.element_size() for t in grads]}
    opt.step()
    out["optimizer_bytes"] = sum(local_tensor(v).numel() * v.element_size()
                                 for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor))
    return out


def run_oom(spec: dict) -> None:
    """Rank spec['rank'] fails its spec['at_call']-th forward (or Ulysses exchange) with the error CUDA would
    raise."""
    from fsdptrain import cli
    from fsdptrain.model import ulysses
    from fsdptrain.objectives import sft

    module, name = (ulysses, "seq_to_heads") if spec.get("in") == "ulysses" else (sft, "token_loss_sum")
    real = getattr(module, name)
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if torch.distributed.get_rank() == spec["rank"] and calls["n"] == spec["at_call"]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated in a test)")
        return real(*args, **kwargs)

    setattr(module, name, failing)  # what the SFT objective calls for each forward; what Ulysses' attention calls
    cli.main(["train", spec["config"]])


def run_watchdog(run_dir: str) -> None:
    """Rank 1 announces a failure and stays alive; rank 0 waits in a collective rank 1 never joins."""
    import time

    import torch.distributed as dist

    from fsdptrain.config.schema import MemoryConfig
    from fsdptrain.memory.tracker import MemoryTracker

    info = distributed.init("cpu")
    mem = MemoryTracker(MemoryConfig(track_peak=False), info, run_dir)
    if info.rank == 1:
        mem.peers.failing = True  # what on_error sets on the failing rank
        dist.distributed_c10d._get_default_store().set(mem.peers.key, "rank 1 failed")
        time.sleep(120)
    else:
        dist.barrier()  # without the watchdog: blocked until the 30-minute process-group timeout
    print(f"rank {info.rank}: still running", flush=True)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    if "watchdog" in spec:
        run_watchdog(spec["watchdog"])
        return
    from fsdptrain.trainer import train

    info = distributed.init("cpu")
    for config in spec.get("train", []):
        train(load_config(config), examples=imbalanced_examples(info.world_size))
    if "model_state" in spec:
        ms = spec["model_state"]
        res = measure_model_state(ms["config"], info)
        Path(ms["out"]).mkdir(parents=True, exist_ok=True)
        (Path(ms["out"]) / f"rank{info.rank}.json").write_text(json.dumps(res))
    distributed.barrier()
    if "oom" in spec:  # last: it ends the launch
        run_oom(spec["oom"])
    distributed.shutdown(info)  # closes the peer watchdog first: a tick in flight at exit aborts the process


if __name__ == "__main__":
    finish(main)
