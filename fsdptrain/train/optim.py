"""AdamW with decay/no-decay groups and warmup + cosine/linear/constant learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config.schema import TrainConfig


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights and biases (all 1-D tensors) get no weight decay."""
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def build_optimizer(model: nn.Module, tcfg: TrainConfig, fused: bool, offload: bool = False) -> torch.optim.Optimizer:
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
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
