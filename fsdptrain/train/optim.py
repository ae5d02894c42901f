"""AdamW with decay/no-decay groups and warmup + cosine/linear/constant learning-rate schedules; the CPU threads
of an optimizer that runs on the CPU."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Optional

import torch
from torch import nn

from ..config.schema import TrainConfig
from .offload_dir import Scratch


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights and biases (all 1-D tensors) get no weight decay."""
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def adamw_fused(device_type: str) -> bool:
    """Whether AdamW runs torch's fused kernel: on CUDA runs, for parameters on the GPU and for those
    parallel.cpu_offload keeps on the CPU (fused CPU AdamW supports CPU DTensors and is about 13x faster than
    foreach there, docs/performance.md). CPU runs keep the foreach kernel (their arithmetic is unchanged)."""
    return device_type == "cuda"


def build_optimizer(model: nn.Module, tcfg: TrainConfig, fused: bool, offload: bool | str = False,
                    scratch: Optional[Scratch] = None, buffer_bytes: int = 0,
                    local_world: int = 1) -> torch.optim.Optimizer:
    """AdamW over the model's trainable parameters. offload: parallel.optimizer_offload (true: state in host
    memory; nvme: in a file of `scratch`, streamed through `buffer_bytes` of host memory)."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    if offload == "nvme":
        from .optim_nvme import NVMeOffloadAdamW

        if scratch is None:
            raise ValueError("optimizer_offload: nvme needs the rank's scratch folder (offload_dir.claim)")
        return NVMeOffloadAdamW(groups, scratch, buffer_bytes, local_world, lr=tcfg.lr, betas=tuple(tcfg.adam_betas),
                                eps=tcfg.adam_eps)
    if offload:
        from .optim_offload import CPUOffloadAdamW

        return CPUOffloadAdamW(groups, lr=tcfg.lr, betas=tuple(tcfg.adam_betas), eps=tcfg.adam_eps)
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=tuple(tcfg.adam_betas), eps=tcfg.adam_eps, **kwargs)


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_steps(tcfg: TrainConfig, total: int) -> int:
    return tcfg.warmup_steps if tcfg.warmup_steps > 0 else int(tcfg.warmup_ratio * total)


def build_scheduler(opt: torch.optim.Optimizer, tcfg: TrainConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    warm = warmup_steps(tcfg, total)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, warm, tcfg.schedule, tcfg.min_lr_ratio)
    )


OMP_UNSET_MARKER = "FSDPTRAIN_OMP_NUM_THREADS_UNSET"  # set by fsdptrain's launcher (launch.py) for torchrun


def user_chose_threads(env: Mapping[str, str], local_world: int) -> bool:
    """Whether OMP_NUM_THREADS is the user's choice. torchrun sets it to 1 in its workers when it is unset and it
    starts more than one (torch/distributed/run.py), so a worker cannot tell that default from a user's 1:
    fsdptrain's launcher records in OMP_UNSET_MARKER whether the user had set it; under torchrun started without
    the launcher, a 1 with several processes on the node counts as torchrun's default."""
    if env.get("OMP_NUM_THREADS", "") == "":
        return False
    marker = env.get(OMP_UNSET_MARKER)
    if marker is not None:
        return marker != "1"
    torchrun_default = env["OMP_NUM_THREADS"] == "1" and "TORCHELASTIC_RUN_ID" in env and local_world > 1
    return not torchrun_default


def cpu_optimizer_threads(env: Mapping[str, str], cpus: int, local_world: int) -> Optional[int]:
    """Intra-op threads for a rank whose optimizer runs on the CPU: its share of the CPUs it may run on
    (cpus // processes on the node, at least 1); None when the user chose OMP_NUM_THREADS."""
    if user_chose_threads(env, local_world):
        return None
    return max(1, cpus // max(1, local_world))


def use_cpu_optimizer_threads(local_world: int) -> Optional[int]:
    """Give this rank its share of the node's CPUs for the optimizer's CPU work (CUDA runs with cpu_offload or
    optimizer_offload: one thread per rank, torchrun's default, halves the update's speed). Returns the thread
    count set, or None when the user's OMP_NUM_THREADS stays."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = cpu_optimizer_threads(os.environ, cpus, local_world)
    if n is not None:
        torch.set_num_threads(n)
    return n
