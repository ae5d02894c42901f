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
    opt, factor = optimizer_and_schedule(model, steps)
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


def optimizer_and_schedule(model: torch.nn.Module, steps: int = STEPS):
    """(AdamW over the trainable parameters, no decay on 1-D ones; the lr factor of step s: warmup + cosine)."""
    decay = [p for p in model.parameters() if p.ndim >= 2 and p.requires_grad]  # frozen ones (peft, freeze) never
    plain = [p for p in model.parameters() if p.ndim < 2 and p.requires_grad]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": HYPER["wd"]}, {"params": plain, "weight_decay": 0.0}],
                            lr=HYPER["lr"], betas=HYPER["betas"], eps=HYPER["eps"])

    def factor(s: int) -> float:
        if s < HYPER["warmup"]:
            return (s + 1) / HYPER["warmup"]
        prog = (s - HYPER["warmup"]) / (steps - HYPER["warmup"])
        return HYPER["min_ratio"] + (1 - HYPER["min_ratio"]) * 0.5 * (1 + math.cos(math.pi * prog))

    return opt, factor


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


# ----------------------------------------------------------------------------- preference training (dpo)


def trl_pair_losses(loss: str, beta: float, c, r, rc=None, rr=None, label_smoothing: float = 0.0,
                    simpo_gamma: float = 0.5):
    """(loss per pair, chosen reward, rejected reward) by TRL's own loss code: CPOTrainer.cpo_loss (sigmoid with
    label smoothing, hinge, ipo, simpo; given the log-ratios to the reference it is DPO's loss) and
    ORPOTrainer.odds_ratio_loss (ORPO's odds-ratio term; the loss adds the chosen response's NLL, as
    LLaMA-Factory's does), called with a stand-in for the trainer's attributes."""
    from types import SimpleNamespace

    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    me = SimpleNamespace(alpha=0.0, beta=beta, loss_type=loss, simpo_gamma=simpo_gamma,
                         label_smoothing=label_smoothing, accelerator=SimpleNamespace(device=c.device))
    if loss == "orpo":
        ratio_losses, cr, rj, _, _ = ORPOTrainer.odds_ratio_loss(me, c, r)
        return -c - ratio_losses, cr, rj
    if rc is None:  # simpo: the policy's log-probabilities themselves
        return CPOTrainer.cpo_loss(me, c, r)
    losses, _, _ = CPOTrainer.cpo_loss(me, c - rc, r - rr)
    return losses, beta * (c - rc).detach(), beta * (r - rr).detach()


def row_logps_reference(model, example) -> tuple[torch.Tensor, int]:
    """(summed log-probability of the row's response tokens, their count): one unpadded row through the model."""
    ids = torch.tensor([example.input_ids])
    target = torch.tensor(example.labels[1:])
    logits = model(input_ids=ids).logits[0, :-1].float()
    mask = target != IGNORE
    logps = logits.log_softmax(-1).gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1)
    return (logps * mask).sum(), int(mask.sum())


def preference_reference(policy, reference, pairs, batches: list[list[int]], pref: dict, steps: int = STEPS):
    """Plain single-process DPO-family loop: per global batch, each pair's chosen and rejected rows through the
    policy (and, unless orpo/simpo, through `reference`: a model, or a callable giving a context in which the
    policy computes as the reference), the loss by TRL's code (trl_pair_losses), mean over the batch's pairs,
    AdamW as reference_run. Returns the per-step losses and metric means (TRL's names)."""
    loss, beta = pref.get("loss", "sigmoid"), pref.get("beta", 0.1)
    per_token = loss in ("ipo", "orpo", "simpo")
    opt, factor = optimizer_and_schedule(policy, steps)
    out = {"loss": [], "rewards/chosen": [], "rewards/accuracies": [], "logps/rejected": []}
    for s, idx in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = HYPER["lr"] * factor(s)
        total, rewards_c, acc, logps_r = 0.0, 0.0, 0.0, 0.0
        for i in idx:
            (c, nc), (r, nr) = (row_logps_reference(policy, pairs[i].chosen),
                                row_logps_reference(policy, pairs[i].rejected))
            if per_token:
                c, r = c / nc, r / nr
            refs = ()
            if loss not in ("orpo", "simpo"):
                with torch.no_grad():
                    if callable(reference) and not isinstance(reference, torch.nn.Module):
                        with reference():
                            (rc, _), (rr, _) = (row_logps_reference(policy, pairs[i].chosen),
                                                row_logps_reference(policy, pairs[i].rejected))
                    else:
                        (rc, _), (rr, _) = (row_logps_reference(reference, pairs[i].chosen),
                                            row_logps_reference(reference, pairs[i].rejected))
                refs = (rc / nc, rr / nr) if per_token else (rc, rr)
            losses, cr, rj = trl_pair_losses(loss, beta, c.reshape(1), r.reshape(1),
                                             *(x.reshape(1) for x in refs),
                                             label_smoothing=pref.get("label_smoothing", 0.0),
                                             simpo_gamma=pref.get("simpo_gamma") or 0.5)
            pair_loss = losses[0] + pref.get("ftx", 0.0) * -(c if per_token else c / nc)
            total = total + pair_loss
            rewards_c += cr.item()
            acc += float(cr.item() > rj.item())
            logps_r += r.item()
        mean = total / len(idx)
        mean.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), HYPER["clip"])
        opt.step()
        opt.zero_grad()
        for key, v in zip(out, (mean.item(), rewards_c / len(idx), acc / len(idx), logps_r / len(idx))):
            out[key].append(v)
    return out
