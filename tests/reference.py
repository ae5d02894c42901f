"""Single-process plain-PyTorch reference training loop and the config the parity tests share.

Written independently of fsdptrain's trainer: per-example forward, loss summed
over the global batch's target tokens and divided by their count, AdamW with no
decay on 1-D params, warmup + cosine schedule, norm clipping.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from fsdptrain.data.encode import IGNORE, tokenize_all
from fsdptrain.data.loader import StepSampler
from fsdptrain.data.synthetic import generate

STEPS = 6
HYPER = dict(lr=5e-3, warmup=2, min_ratio=0.1, wd=0.1, clip=0.5, betas=(0.9, 0.95), eps=1e-8)


def base_config(out: Path, model_dir: Path, **sections) -> dict:
    cfg = {
        "output_dir": str(out), "seed": 7,
        "model": {"path": str(model_dir)},
        "data": {"synthetic_task": "add", "synthetic_examples": 64, "max_length": 64},
        "train": {"max_steps": STEPS, "micro_batch_size": 2, "grad_accum_steps": 1, "lr": HYPER["lr"],
                  "warmup_steps": HYPER["warmup"], "schedule": "cosine", "min_lr_ratio": HYPER["min_ratio"],
                  "weight_decay": HYPER["wd"], "max_grad_norm": HYPER["clip"], "adam_betas": list(HYPER["betas"])},
        "parallel": {"device": "cpu", "precision": "fp32"},
        "logging": {"log_every": 1, "tensorboard": False, "progress": "none"},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def reference_run(model_dir: Path | torch.nn.Module, examples, batches: list[list[int]], steps: int = STEPS):
    """Plain single-process loop over the given global batches (the schedule spans `steps`); returns (losses,
    model). model_dir: a folder to load, or a transformers model already loaded (it is trained in place)."""
    from transformers import AutoModelForCausalLM

    model = model_dir
    if not isinstance(model, torch.nn.Module):
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    decay = [p for p in model.parameters() if p.ndim >= 2 and p.requires_grad]  # frozen ones (peft, freeze) never
    plain = [p for p in model.parameters() if p.ndim < 2 and p.requires_grad]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": HYPER["wd"]}, {"params": plain, "weight_decay": 0.0}],
                            lr=HYPER["lr"], betas=HYPER["betas"], eps=HYPER["eps"])

    def factor(s: int) -> float:
        if s < HYPER["warmup"]:
            return (s + 1) / HYPER["warmup"]
        prog = (s - HYPER["warmup"]) / (steps - HYPER["warmup"])
        return HYPER["min_ratio"] + (1 - HYPER["min_ratio"]) * 0.5 * (1 + math.cos(math.pi * prog))

    losses = []
    for s, idx in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = HYPER["lr"] * factor(s)
        count = 0
        sums = []
        for i in idx:
            ids = torch.tensor([examples[i].input_ids])
            target = torch.tensor([examples[i].labels[1:] + [IGNORE]])
            logits = model(input_ids=ids).logits
            sums.append(F.cross_entropy(logits[0], target[0], ignore_index=IGNORE, reduction="sum"))
            count += int((target != IGNORE).sum())
        loss = torch.stack(sums).sum() / count
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), HYPER["clip"])
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, model


def train_reference(model: torch.nn.Module, examples, batches: list[list[int]]) -> list[float]:
    """reference_run's losses for a loaded model whose frozen parameters (requires_grad False) stay fixed."""
    return reference_run(model, examples, batches)[0]




def synthetic_examples(model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    examples, _ = tokenize_all(tok, generate("add", 64, 7), 64)
    return examples


def global_batches(n: int, shuffle: bool = True) -> list[list[int]]:
    sampler = StepSampler(n, world_size=1, rank=0, micro_batch_size=4, grad_accum_steps=1, seed=7, shuffle=shuffle)
    return [sampler.global_indices(s) for s in range(STEPS)]
