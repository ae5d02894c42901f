"""parallel.optimizer_offload across a resume: save at step 2, resume, take step 3, and say where the AdamW state is.

    python benchmarks/offload_resume_check.py [key=value ...]     # the demo model; overrides as for fsdptrain train

Prints the device and dtype of the optimizer state right after the checkpoint is loaded and after step 3, and the
resumed step 3's loss next to an uninterrupted run's. On a GPU the state must stay on the CPU in fp32 (a load
through torch.optim casts it to its parameter's device and dtype unless the offloading optimizer puts it back),
and step 3 must run (a CUDA state with CPU gradients fails in the fused update). benchmarks/gpu_check.sh runs it.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from fsdptrain.config.schema import load_config
from fsdptrain.dist import distributed
from fsdptrain.trainer import loop, setup, train


def state_places(optimizer: torch.optim.Optimizer) -> str:
    """'cpu float32 (exp_avg, exp_avg_sq, step)'-style summary of where every state tensor lives."""
    places: dict[str, set[str]] = {}
    for st in optimizer.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                local = getattr(v, "_local_tensor", v)
                places.setdefault(f"{local.device.type} {str(local.dtype).removeprefix('torch.')}", set()).add(k)
    return "; ".join(f"{place} ({', '.join(sorted(keys))})" for place, keys in sorted(places.items())) or "empty"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        common = [f"output_dir={tmp}/run", "parallel.optimizer_offload=true", "checkpoint.save_every=2",
                  "checkpoint.keep_last=0", "data.val_size=0", "train.eval_every=0", "logging.progress=none",
                  "logging.tensorboard=false", "logging.log_every=1", "data.synthetic_examples=256", *args.overrides]
        common.append("train.max_steps=3")
        full = train(load_config(None, common)).losses
        cfg = load_config(None, [*common, f"checkpoint.resume={tmp}/run/checkpoints/step-00000002"])
        info = distributed.init(cfg.parallel.device, cfg.parallel.timeout_minutes)
        try:
            run = setup(cfg, info)
            loaded = state_places(run.optimizer)
            try:
                resumed = loop(run).losses
            finally:
                if run.lock is not None:
                    run.lock.release()
            after = state_places(run.optimizer)
        finally:
            distributed.shutdown(info)
    if info.is_main:
        print(f"optimizer_offload resume: state after the load: {loaded}")
        print(f"optimizer_offload resume: state after step 3: {after}")
        print(f"optimizer_offload resume: step 3 loss resumed {resumed[-1]:.6f}, uninterrupted {full[-1]:.6f}")


if __name__ == "__main__":
    main()
