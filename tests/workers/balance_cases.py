"""Training cases for data.balance in one launched process group, with an optional stand-in for a slow GPU.

Usage (under torchrun): python -m tests.workers.balance_cases SPEC.json
SPEC: {"cases": [{"config": yaml path, "slow": null | {"forward": [s_rank0, s_rank1, ...], "backward": [...]}}]}
slow: inside every block (a hook on its MLP), rank r sleeps forward[r] x (rows x width) seconds in the forward
and backward[r] x (rows x width) in the backward, so its blocks compute as if that much slower each way. The stand-in
is part of the block's compute, not of the clock that measures it.
Each rank writes the examples it took at each step to OUTPUT_DIR/examples-rank<r>.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from fsdptrain import trainer
from fsdptrain.config.schema import load_config
from fsdptrain.dist import distributed
from fsdptrain.train import balance
from fsdptrain.trainer import train
from tests.workers import finish

_clock_init = balance.ComputeClock.__init__
_train_step = trainer.train_step


class _SlowBackward(torch.autograd.Function):
    """Identity whose backward sleeps `seconds` first."""

    @staticmethod
    def forward(ctx, seconds: float, x: torch.Tensor) -> torch.Tensor:
        ctx.seconds = seconds
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        time.sleep(ctx.seconds)
        return None, grad


def slow_blocks(forward: float, backward: float):
    """ComputeClock.__init__ that also slows every block's MLP by these seconds per token, each way."""

    def init(self, blocks, device) -> None:
        _clock_init(self, blocks, device)

        def hook(module, args, output):
            tokens = output.shape[0] * output.shape[1]
            time.sleep(forward * tokens)
            return _SlowBackward.apply(backward * tokens, output)

        if forward or backward:
            self._handles.extend(block.mlp.register_forward_hook(hook) for block in blocks)

    return init


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    info = distributed.init("cpu")
    for case in spec["cases"]:
        slow = case.get("slow") or {"forward": [0.0] * info.world_size, "backward": [0.0] * info.world_size}
        balance.ComputeClock.__init__ = slow_blocks(slow["forward"][info.rank], slow["backward"][info.rank])
        cfg = load_config(case["config"])
        taken: list[int] = []

        def step(run, batches, *a, _taken=taken, **k):
            _taken.append(sum(int(b["input_ids"].shape[0]) for b in batches))
            return _train_step(run, batches, *a, **k)

        trainer.train_step = step
        train(cfg)
        Path(cfg.output_dir, f"examples-rank{info.rank}.json").write_text(json.dumps(taken))
    distributed.barrier()
    distributed.shutdown(info)  # closes the peer watchdog first: a tick in flight at exit aborts the process


if __name__ == "__main__":
    finish(main)
