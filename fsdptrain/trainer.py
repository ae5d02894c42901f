"""The training loop, top to bottom: set up, build, shard, load, then step.

Read `train()` as the recipe. Each optimizer step:
  1. take this rank's micro-batches for the step (see data/loader.py);
  2. one all_reduce of the target-token count over all ranks and micro-batches;
  3. per micro-batch: forward, summed cross-entropy scaled by world_size /
     global_targets (FSDP averages gradients over ranks, so the product is the
     gradient of the global per-token mean loss whatever the split), backward,
     with gradient reduction only on the last micro-batch;
  4. clip the global grad norm, check loss and norm are finite, step.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from . import distributed, models
from .checkpoint import Checkpointer, archive_previous_run, resolve_resume
from .export import EXPORT_DTYPES, export_hf
from .config import Config, dump_yaml, parse_size
from .data import pipeline
from .data.tokenize import IGNORE, Example
from .data.tokenizer import load_tokenizer
from .errors import TrainingError, UserError
from .loss import install_chunked_loss, token_loss_sum
from .memory.tracker import MemoryTracker
from .mesh import build_mesh, describe
from .metrics import RunLogger, console, peak_tflops
from .optim import build_optimizer, build_scheduler
from .memory.estimate import plan_auto_checkpointing
from .parallelize import apply_fsdp
from .plan import check_device_support, resolve_precision


@dataclass
class RunResult:
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    peak_mem_bytes: int = 0
    steps: int = 0
    skipped_steps: int = 0
    output_dir: str = ""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def grad_norm_and_clip(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global L2 norm of all (sharded) gradients; clips when max_norm > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def train(cfg: Config, examples: Optional[list[Example]] = None) -> RunResult:
    """Run training as configured. `examples` replaces the configured data (tests, notebooks)."""
    info = distributed.init(cfg.parallel.device, cfg.parallel.timeout_minutes)
    try:
        return _train(cfg, info, examples)
    finally:
        distributed.shutdown(info)


def _train(cfg: Config, info: distributed.DistInfo, examples: Optional[list[Example]]) -> RunResult:
    # -- run directory (rank 0 writes shared files) -------------------------------------------
    check_device_support(cfg.parallel, info.device_type)
    out = Path(cfg.output_dir)
    fresh = resolve_resume(cfg.checkpoint.resume, out) is None  # else the checkpointer resumes below
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        moved = archive_previous_run(out) if fresh else None
        (out / "config.yaml").write_text(dump_yaml(cfg))
    distributed.barrier()
    seed_everything(cfg.seed)

    # -- tokenizer and data -------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model.tokenizer, cfg.model.path, cfg.model.trust_remote_code)
    say = console(info.is_main)
    say(f"fsdptrain: world size {info.world_size}, device {info.device_type}, backend {info.backend}")
    if info.is_main and moved:
        say(f"output_dir: a new run starts in {out}; the earlier run's outputs were moved to {moved}")
    if examples is None:
        examples = pipeline.load_examples(cfg, tokenizer, info.rank, info.local_rank, say)
    sampler = pipeline.build_sampler(cfg, examples, info.world_size, info.rank, info.local_world_size)
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * sampler.steps_per_epoch))

    # -- model: meta -> shard -> materialise local shards ------------------------------------
    hf_config = models.load_hf_config(cfg.model.path, cfg.model.hf_config if cfg.model.path is None else None,
                                      len(tokenizer), cfg.model.trust_remote_code)
    if len(tokenizer) > hf_config.vocab_size:
        raise UserError(f"model: tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                        f"{hf_config.vocab_size}; use the model's own tokenizer or a larger vocab_size")
    precision = resolve_precision(cfg.parallel.precision, info.device_type)
    model = models.build_meta_model(hf_config, cfg.model.attn_implementation, models.DTYPES[precision],
                                    cfg.model.trust_remote_code)
    n_params = models.count_params(model)
    blocks = models.find_blocks(model)
    mesh = build_mesh(info, cfg.parallel)
    modes = None
    if cfg.parallel.activation_checkpointing == "auto":  # planned from the memory estimate, before sharding
        modes, note = plan_auto_checkpointing(cfg, model, info.world_size, info.local_world_size, info.device)
        say(note)
    plan = apply_fsdp(model, blocks, mesh, cfg.parallel, info.device_type, modes)
    weights = None if (cfg.model.path is None or cfg.model.random_init) else cfg.model.path
    models.materialize(model, torch.device("cpu") if plan.offload else info.device, cfg.seed, weights,
                      init_device=info.device)
    say(f"model: {hf_config.model_type}, {n_params / 1e6:.2f}M params, {len(blocks)} blocks, "
                  f"precision {plan.precision}, checkpointed blocks {len(plan.checkpointed)}, "
                  f"offload {plan.offload}, mesh {describe(mesh)}, weights {'from ' + weights if weights else 'random init'}")
    seed_everything(cfg.seed + info.rank)  # dropout etc. differ per rank; data order does not use this

    # -- optimizer and schedule ---------------------------------------------------------------
    loss_head = install_chunked_loss(model, cfg.train.loss_chunk_tokens,
                                     cfg.parallel.compile_backend if cfg.parallel.compile else None)
    optimizer = build_optimizer(model, cfg.train, fused=info.device_type == "cuda" and not plan.offload,
                                offload=cfg.parallel.optimizer_offload)
    scheduler = build_scheduler(optimizer, cfg.train, total_steps)
    ckpt = Checkpointer(cfg.checkpoint, out, info.rank, info.world_size, plan.precision, say)
    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum_steps
    state = ckpt.resume(model, optimizer, scheduler, sampler, micro, accum, total_steps)

    # -- the loop -----------------------------------------------------------------------------
    log = RunLogger(out, info.is_main, cfg.logging.tensorboard, cfg.logging.progress, total_steps, state.step)
    peak = peak_tflops(info.device, cfg.logging.peak_tflops)
    result = RunResult(output_dir=str(out))
    pad_id = tokenizer.pad_token_id
    mem = MemoryTracker(cfg.memory, info, out, model, blocks)  # per-phase records, OOM post-mortem
    model.train()
    step_batches = iter(pipeline.batches(cfg, sampler, examples, pad_id, state.step, total_steps, info.device_type))
    try:
        for step in range(state.step, total_steps):
            t0 = time.perf_counter()
            batches = next(step_batches)
            sampler.step = step + 1  # the data position a checkpoint taken after this step resumes from
            mem.step_start(step, batches)

            # One all_reduce: target tokens (normaliser) and input tokens (throughput) of the whole step.
            counts = torch.tensor([sum(int((b["labels"] != IGNORE).sum()) for b in batches),
                                   sum(int(b["n_tokens"]) for b in batches)], dtype=torch.float64, device=info.device)
            distributed.all_reduce_sum(counts)
            # The loss scale stays on the device: reading the counts here would make the CPU wait for the
            # previous step's optimizer before it could queue this step's forward.
            scale = (info.world_size / counts[0].clamp(min=1.0)).float()

            loss_sum = torch.zeros((), dtype=torch.float32, device=info.device)
            for i, b in enumerate(batches):
                if not cfg.parallel.sync_grads_every_micro_step:
                    model.set_requires_gradient_sync(i == accum - 1)
                batch = {k: v.to(info.device, non_blocking=True) for k, v in b.items() if k != "n_tokens"}
                micro_loss = token_loss_sum(model, batch, loss_head)
                mem.phase("forward", i)
                (micro_loss * scale).backward()
                mem.phase("backward", i)
                loss_sum += micro_loss.detach()

            grad_norm = grad_norm_and_clip(model, cfg.train.max_grad_norm).float()
            per_rank = distributed.all_gather_rows(loss_sum.reshape(1), info.world_size).flatten()
            targets_total, global_tokens = counts.tolist()  # the step's first host sync
            global_targets = max(1.0, targets_total)
            state.step, state.tokens_seen = step + 1, state.tokens_seen + int(global_tokens)
            loss = per_rank.sum().item() / global_targets
            norm = grad_norm.item()
            if not (math.isfinite(loss) and math.isfinite(norm)):
                bad = [r for r, v in enumerate(per_rank.tolist()) if not math.isfinite(v)]
                where = f"loss on rank(s) {bad}" if bad else "gradient norm (all ranks' losses finite)"
                if cfg.train.on_nonfinite == "stop":
                    raise TrainingError(
                        f"non-finite {where} at step {step + 1}: loss={loss}, grad_norm={norm}; "
                        "lower train.lr, check the data, or set train.on_nonfinite=skip"
                    )
                log.info(f"step {step + 1}: non-finite {where}; update skipped")
                result.skipped_steps += 1
                optimizer.zero_grad(set_to_none=True)
                continue
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            mem.phase("optimizer")

            dt = time.perf_counter() - t0
            result.losses.append(loss)
            result.grad_norms.append(norm)
            result.step_times.append(dt)
            result.tokens.append(int(global_tokens))
            result.steps = step + 1
            if step == 0 or (step + 1) % cfg.logging.log_every == 0 or step + 1 == total_steps:
                tok_s = global_tokens / dt / info.world_size
                metrics = {"loss": loss, "lr": lr, "grad_norm": norm, "tokens": int(global_tokens),
                           "target_tokens": int(global_targets), "step_time_s": dt,
                           "tokens_per_s_per_device": tok_s}
                if peak:
                    seq = max(b["input_ids"].shape[1] for b in batches)
                    mfu = models.flops_per_token(hf_config, n_params, seq) * tok_s / (peak * 1e12)
                    metrics["mfu"] = mfu
                metrics.update(mem.gather(step + 1, log))
                result.peak_mem_bytes = max(result.peak_mem_bytes, mem.peak_bytes_max)
                log.log(step + 1, metrics)
            if ckpt.due(step + 1, total_steps):
                ckpt.save(state, model, optimizer, scheduler, sampler, hf_config, tokenizer, micro, accum)
        if ckpt.due(state.step, total_steps):  # the last step was skipped (non-finite)
            ckpt.save(state, model, optimizer, scheduler, sampler, hf_config, tokenizer, micro, accum)
        ckpt.close()
    except BaseException as e:
        mem.on_error(e, model, optimizer)  # OOM: post-mortem and stop every rank; otherwise re-raised
        raise
    finally:
        mem.close()
        log.close()

    if cfg.checkpoint.export_hf:
        name = cfg.checkpoint.export_dtype
        export_dtype = EXPORT_DTYPES[name] if name != "auto" else (
            torch.bfloat16 if plan.precision.startswith("bf16") else torch.float32)
        export_hf(model, hf_config, tokenizer, out / "hf", info.is_main, dtype=export_dtype,
                  max_shard_bytes=parse_size(cfg.checkpoint.export_max_shard_size, "checkpoint.export_max_shard_size"))
        say(f"export: Hugging Face model written to {out / 'hf'}")
    if result.losses:
        say(f"done: {result.steps} steps, loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}, "
                      f"skipped {result.skipped_steps}; outputs in {out}")
    return result
