"""The training recipe: `setup` builds one Run in named stages, then a short loop calls `train_step`.

Each optimizer step (`train_step`):
  1. this rank's micro-batches for the step (see data/loader.py);
  2. one all_reduce of the objective's units (target tokens for SFT: the
     normaliser) and the input tokens over all ranks and micro-batches;
  3. per micro-batch: forward and the objective's summed loss (run.objective,
     objectives/base.py), scaled by world_size / global units (FSDP averages
     gradients over ranks, so the product is the gradient of the global mean
     over every unit whatever the split), backward, with gradient reduction
     only on the last micro-batch when configured; MoE models add
     router_aux_coef x the router's auxiliary loss / micro-batches (see
     docs/moe.md);
  4. clip the global grad norm, check loss and norm are finite, step.
Step numbers are 1-based throughout: step s is the s-th optimizer step, and
`run.state.step` counts the steps done.
"""

from __future__ import annotations

import gc
import json
import math
import random
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .config.schema import Config, parse_size
from .core import log
from .core.errors import RunStopped, TrainingError, UserError
from .core.files import write_atomic
from .core.units import format_bytes
from .data import pipeline
from .data.encode import Example
from .data.loader import StepSampler, to_device
from .data.tokenizer import load_tokenizer
from .dist import context, distributed
from .dist.distributed import DistInfo
from .dist.plan import check_device_support
from .dist.stopping import StopRequests, job_deadline
from .memory import breakdown
from .memory import stats as memstats
from .memory.tracker import MemoryTracker
from .model import models, moe, packcheck, ulysses
from .objectives.base import Objective, metric_means
from .objectives.choose import needs_reference_model, objective_for
from .objectives.loss import ChunkedLossHead, install_chunked_loss
from .run import rundir
from .run.checkpoint import Checkpointer, Saved, TrainState, resolve_resume, step_name
from .run.export import check_target, export_dtype, export_hf, training_export_check
from .run.metrics import RunLogger, peak_tflops
from .run.sinks import open_sinks
from .train import offload_dir
from .train.balance import COMPUTE_FILE, ComputeClock, ComputeTotals, SpeedBalance, time_report
from .train.build import ShardedModel, build_reference, build_sharded_model, reference_config
from .train.evaluate import EvalResult, eval_micro_batch, evaluate
from .train.optim import adamw_fused, build_optimizer, build_scheduler, use_cpu_optimizer_threads

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from .memory.estimate import Estimate


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
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, eval loss) of every evaluation


@dataclass
class Run:
    """Everything one training run holds, built by `setup`."""
    cfg: Config
    info: DistInfo
    out: Path
    tokenizer: PreTrainedTokenizerBase
    hf_config: PretrainedConfig
    examples: Any  # a sequence of data.encode.Example (or packed rows)
    sampler: StepSampler
    total_steps: int
    sharded: ShardedModel
    objective: Objective  # what a step optimises (objectives/)
    loss_head: Optional[ChunkedLossHead]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    state: TrainState
    checkpointer: Checkpointer
    logger: RunLogger
    tracker: MemoryTracker
    peak_tflops: Optional[float]
    result: RunResult
    lock: Optional[rundir.RunLock]  # output_dir's lock, held by rank 0
    started: float = field(default_factory=time.time)  # when train() began (the job's wall time counts from it)
    router_aux_coef: float = 0.0  # MoE: weight of the router's auxiliary loss in the objective (moe.py)
    expert_load: Optional[moe.ExpertLoad] = None  # MoE: tokens routed to each expert since the last log step
    eval_examples: Any = None  # held-out examples (data.val_size / data.eval_datasets), packed like training's
    balance: Optional[SpeedBalance] = None  # data.balance speed: the ranks' shares of a step, from their speeds
    clock: Optional[ComputeClock] = None  # this rank's compute time (several ranks: the time report, balance)
    compute: ComputeTotals = field(default_factory=ComputeTotals)  # the clock's sums over the run
    context_index: int = 0  # parallel.context_parallel: the chunk of every row this rank takes (dist/context.py)

    @property
    def model(self) -> nn.Module:
        return self.sharded.model


@dataclass
class StepStats:
    step: int  # 1-based
    loss: float  # mean over the step's units (target tokens for SFT), all ranks
    grad_norm: float  # before clipping
    lr: float  # the rate this step's update used
    tokens: int  # input tokens of the step, all ranks
    target_tokens: int  # the objective's units of the step, all ranks (the normaliser)
    seq_len: int  # the longest sequence of this rank's micro-batches (row, or flash attention's varlen sequence)
    aux_loss: Optional[float] = None  # MoE router auxiliary loss: mean over all ranks' micro-batches
    seconds: float = 0.0
    skipped: bool = False  # non-finite loss or norm: no update
    stop_code: int = 0  # the largest stop request over all ranks (dist/stopping.py; 0: none)
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's metrics: step sum / global units


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


# ----------------------------------------------------------------------------- set-up, in stages


def claim_output_dir(cfg: Config, info: DistInfo) -> tuple[Path, Optional[rundir.RunLock], bool]:
    """Rank 0 takes output_dir's lock and checks a fresh start may use it; every rank must see the folder.
    Nothing is written into it yet. Returns (output_dir, the lock on rank 0, whether the start is fresh)."""
    out = Path(cfg.output_dir)
    fresh = resolve_resume(cfg.checkpoint.resume, out) is None  # else the checkpointer resumes

    def take() -> rundir.RunLock:
        held = rundir.lock(out)
        try:
            if fresh:
                rundir.check_fresh_start(out)
            elif cfg.checkpoint.export_hf:  # a resumed run keeps output_dir/hf: refuse a foreign one now
                check_target(out / "hf", **training_export_check(out / "hf"))
        except BaseException:
            held.release()
            raise
        return held

    held = distributed.on_rank0(take)
    try:
        rundir.check_shared(out, info)
    except BaseException:
        if held is not None:
            held.release()
        raise
    log.info(f"fsdptrain: world size {info.world_size}, device {info.device_type}, backend {info.backend}")
    return out, held, fresh


def write_run_files(cfg: Config, info: DistInfo, out: Path, fresh: bool) -> None:
    """Once every check of the start has passed: archive an earlier run (fresh start) and write config.yaml."""
    moved = rundir.prepare(out, cfg, fresh) if info.is_main else None
    distributed.barrier()
    if moved:
        log.info(f"output_dir: a new run starts in {out}; the earlier run's outputs were moved to {moved}")


def setup_data(cfg: Config, info: DistInfo, tokenizer: PreTrainedTokenizerBase,
               examples: Optional[list[Example]], lay: context.ContextLayout) -> tuple[Any, StepSampler, int, Any]:
    """Examples, this rank's sampler, the number of optimizer steps and the eval examples (or None). Under
    parallel.context_parallel N the sampler deals to world / N data ranks: a context group reads the same rows."""
    examples, evals = pipeline.load_train_eval(cfg, tokenizer, info.rank, info.local_rank, log.info, examples)
    sampler = pipeline.build_sampler(cfg, examples, lay.data_world, lay.data_rank, info.local_world_size)
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * sampler.steps_per_epoch))
    return examples, sampler, total_steps, evals


def setup_hf_config(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    hf_config = models.load_hf_config(cfg.model.path, cfg.model.hf_config if cfg.model.path is None else None,
                                      len(tokenizer), cfg.model.trust_remote_code)
    if cfg.train.objective == "rm":  # the family's sequence-classification model, one label (models.py)
        hf_config = models.as_reward_config(hf_config, tokenizer.pad_token_id)
    elif models.is_reward_config(hf_config):
        raise UserError(f"model.path: {cfg.model.path} holds a reward model ({hf_config.architectures[0]}, no "
                        "language-model head); train it with train.objective=rm, or pick a causal LM")
    if len(tokenizer) > hf_config.vocab_size:
        raise UserError(f"model: tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                        f"{hf_config.vocab_size}; use the model's own tokenizer or a larger vocab_size")
    if (warning := models.check_context_length(hf_config, cfg.data.max_length)) is not None:
        log.info(warning)
    if cfg.data.packing:  # refuse packing for a model whose packed examples would see each other
        packcheck.check_packing(hf_config, cfg.model.attn_implementation, cfg.model.trust_remote_code)
    return hf_config


def setup(cfg: Config, info: DistInfo, examples: Optional[list[Example]] = None) -> Run:
    """Build the run: output_dir's lock, tokenizer and data, sharded model, optimizer, checkpointer (resumes),
    then the run's files and logs. A failed start writes nothing into output_dir (and releases its lock)."""
    check_device_support(cfg.parallel, info.device_type)
    breakdown.check(cfg)
    with log.held():  # until the inputs are checked (_setup releases it): a mistake found is the only line printed
        out, held, fresh = claim_output_dir(cfg, info)
        try:
            return _setup(cfg, info, examples, out, held, fresh)
        except BaseException:
            if held is not None:
                held.release()
            raise


def _setup(cfg: Config, info: DistInfo, examples: Optional[list[Example]], out: Path,
           held: Optional[rundir.RunLock], fresh: bool) -> Run:
    seed_everything(cfg.seed)
    lay = context.layout(cfg.parallel.context_parallel, info.world_size, info.rank)  # refused before any work
    tokenizer = load_tokenizer(cfg.model.tokenizer, cfg.model.path, cfg.model.trust_remote_code)
    examples, sampler, total_steps, evals = setup_data(cfg, info, tokenizer, examples, lay)
    hf_config = setup_hf_config(cfg, tokenizer)
    predicted = offload_estimate(cfg, info)  # offload: this rank's host and drive bytes, from the model's skeleton
    check_host_memory(cfg, info, predicted)  # the node's host memory, before any weight loads
    scratch = claim_offload_dir(cfg, info, out, predicted)  # parallel.optimizer_offload: nvme; before the model
    try:
        return _setup_model(cfg, info, out, held, fresh, tokenizer, examples, sampler, total_steps, evals,
                            hf_config, scratch, lay)
    except BaseException:
        if scratch is not None:  # the optimizer's file with it
            scratch.close()
        raise


def claim_offload_dir(cfg: Config, info: DistInfo, out: Path,
                      predicted: Optional[Estimate]) -> Optional[offload_dir.Scratch]:
    """parallel.optimizer_offload: nvme: this rank's marked subfolder of parallel.offload_dir (its checks; the free
    space against the state's predicted size, when the estimator could build the model: the optimizer checks the
    exact size anyway)."""
    if cfg.parallel.optimizer_offload != "nvme":
        return None
    if cfg.checkpoint.async_save:
        log.info("checkpoint.async_save: every save copies the whole AdamW state from parallel.offload_dir into "
                 "host memory while it is written; set checkpoint.async_save=false to stream it from the file")
    scratch = offload_dir.claim(cfg.parallel.offload_dir, out, info.rank, info.world_size)
    if predicted is not None:
        try:
            offload_dir.check_space(scratch.root, predicted.nvme_per_rank, info.local_world_size)
        except BaseException:
            scratch.close()
            raise
    return scratch


def check_host_memory(cfg: Config, info: DistInfo, predicted: Optional[Estimate]) -> None:
    """cpu_offload / optimizer_offload: the host memory this node's ranks will hold, as the memory estimator
    predicts it (its CPU line), against what the node has available (MemAvailable). One line before any weight
    loads when it will not fit, instead of the kernel's out-of-memory killer mid-run, which ends a rank with
    SIGKILL and no word (parallel.host_memory_check: false skips it)."""
    p = cfg.parallel
    if not (p.cpu_offload or p.optimizer_offload) or not p.host_memory_check:
        return
    need = predicted.cpu_per_rank if predicted is not None else None
    # every rank reads the node's memory at once, before any of them allocates (one that has would count twice)
    distributed.barrier()
    host = memstats.available_host_bytes()
    distributed.barrier()
    if need is None or host is None:
        log.info("parallel.host_memory_check: skipped (" + ("the memory estimator cannot build this model"
                 if need is None else "no /proc/meminfo or memory cgroup to read") + ")")
        return
    avail, source = host
    if need * info.local_world_size <= avail:
        return
    ranks = info.local_world_size
    if p.cpu_offload:
        key, held, instead = "cpu_offload", "parameters, gradients and AdamW state", \
            "parallel.optimizer_offload instead (parameters and gradients stay on the GPU)"
    elif p.optimizer_offload == "nvme":
        key, held, instead = "optimizer_offload", "the stream's buffers", "a smaller parallel.offload_buffer_size"
    else:
        key, held, instead = "optimizer_offload", "AdamW state and its staging", \
            "parallel.optimizer_offload=nvme (the state on a drive)"
    who = (f"the {ranks} ranks on this node need about {format_bytes(need * ranks)} of host memory "
           f"({format_bytes(need)} each: {held})" if ranks > 1 else
           f"this rank needs about {format_bytes(need)} of host memory ({held})")
    raise UserError(f"parallel.{key}: {who} and {format_bytes(avail)} is available ({source}); use more "
                    f"nodes, {instead}, or set parallel.host_memory_check=false to start anyway")


def offload_estimate(cfg: Config, info: DistInfo) -> Optional[Estimate]:
    """With cpu_offload or optimizer_offload: this rank's memory estimate (its host line, its NVMe bytes) from the
    config's model skeleton on the meta device, seconds even for 70B, so that a node's host memory or a drive too
    small is said before the weights load; None without offload, or when the estimator cannot build the model."""
    import dataclasses

    from .memory import estimate

    if not (cfg.parallel.cpu_offload or cfg.parallel.optimizer_offload):
        return None
    nnodes = max(1, info.world_size // max(1, info.local_world_size))
    # the host and drive lines do not depend on what is recomputed; auto would plan for a GPU budget first
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, activation_checkpointing="none"))
    try:
        shape = estimate.shape_from_config(cfg)
        s = estimate.settings_from_config(cfg, nnodes, info.world_size // nnodes, 1, device_type=info.device_type)
        return estimate.compute(shape, s, info.rank % s.shard_world)
    except Exception:  # noqa: BLE001  (a best-effort early check; the exact ones follow)
        return None


def close_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """parallel.optimizer_offload: nvme: stop its I/O threads and delete its scratch files."""
    close = getattr(optimizer, "close", None)
    if close is not None:
        close()


def _setup_model(cfg: Config, info: DistInfo, out: Path, held: Optional[rundir.RunLock], fresh: bool,
                 tokenizer: PreTrainedTokenizerBase, examples: Any, sampler: StepSampler, total_steps: int,
                 evals: Any, hf_config: PretrainedConfig, scratch: Optional[offload_dir.Scratch],
                 lay: context.ContextLayout) -> Run:
    ref_config = reference_config(cfg, hf_config) if needs_reference_model(cfg) else None  # preference.ref_model
    log.release()  # data and model config are fine: what was said so far is printed, the rest as it comes
    sharded = build_sharded_model(cfg, info, hf_config)
    log.info(sharded.describe(hf_config))
    # a preference run's reference: before resuming, so that it is the starting weights (train/build.py)
    reference = build_reference(cfg, info, hf_config, sharded, ref_config) if needs_reference_model(cfg) else None
    seed_everything(cfg.seed + info.rank)  # dropout etc. differ per rank; data order does not use this

    model, plan = sharded.model, sharded.plan
    loss_head = install_chunked_loss(model, cfg.train.loss_chunk_tokens,
                                     cfg.parallel.compile_backend if cfg.parallel.compile else None)
    if info.device_type == "cuda" and (plan.offload or cfg.parallel.optimizer_offload):  # an optimizer on the CPU
        threads = use_cpu_optimizer_threads(info.local_world_size)
        log.info(f"optimizer: updates on the CPU with {threads} threads per rank (the node's CPUs shared by its "
                 "ranks; OMP_NUM_THREADS chooses)" if threads else
                 f"optimizer: updates on the CPU with OMP_NUM_THREADS={torch.get_num_threads()} threads per rank")
    optimizer = build_optimizer(model, cfg.train, fused=adamw_fused(info.device_type),
                                offload=cfg.parallel.optimizer_offload, scratch=scratch,
                                buffer_bytes=parse_size(cfg.parallel.offload_buffer_size,
                                                        "parallel.offload_buffer_size"),
                                local_world=info.local_world_size)
    if scratch is not None:
        log.info(f"optimizer: AdamW moments in {optimizer.path} ({format_bytes(optimizer.nbytes)} on rank "
                 f"{info.rank}), streamed with the gradients and shards through {optimizer.slots} host buffers "
                 + ("with direct I/O" if optimizer.direct else "through the page cache (no direct I/O there)"))
    scheduler = build_scheduler(optimizer, cfg.train, total_steps)
    ft = sharded.finetune
    saved = Saved(model, optimizer, scheduler, sampler, hf_config, tokenizer,
                  cfg.train.micro_batch_size, cfg.train.grad_accum_steps,
                  finetune=ft.identity(sharded.weights) if ft is not None and ft.method != "full" else None)
    state = TrainState()
    checkpointer = Checkpointer(cfg.checkpoint, out, info.rank, info.world_size, plan.precision, saved, state)
    checkpointer.resume(total_steps)
    write_run_files(cfg, info, out, fresh)
    if state.step and info.is_main:
        rundir.trim_metrics(out / "metrics.jsonl", state.step)  # the steps after the checkpoint run again

    logger = RunLogger(out, info.is_main, cfg.logging.tensorboard, cfg.logging.progress, total_steps, state.step,
                       sinks=open_sinks(cfg, out))
    tracker = MemoryTracker(cfg.memory, info, out, model, sharded.blocks)  # per-phase records, OOM post-mortem
    run = Run(cfg, info, out, tokenizer, hf_config, examples, sampler, total_steps, sharded,
              objective_for(cfg, reference), loss_head,
              optimizer, scheduler, state, checkpointer, logger, tracker,
              peak_tflops(info.device, cfg.logging.peak_tflops), RunResult(output_dir=str(out)), held,
              router_aux_coef=moe.resolve_aux_coef(cfg.train.router_aux_loss_coef, model),
              expert_load=moe.track_expert_load(model, info.device), eval_examples=evals)
    setup_balance(run)
    ulysses.use_group(context.build_group(lay), lay.size)
    run.context_index = lay.index
    if lay.size > 1:
        log.info(f"context parallel: {lay.size} consecutive ranks per row (Ulysses attention), {lay.data_world} "
                 f"data-parallel group(s); weights sharded over all {lay.world} ranks")
        if run.router_aux_coef:  # the balancing loss multiplies two means over the forward's tokens: the rows'
            moe.balance_over_context(run.model)
    return run


def setup_balance(run: Run) -> None:
    """Several ranks: time each rank's compute (the end's time report, data.balance speed); data.balance: say how
    a step is split between the ranks."""
    cfg, info, shares = run.cfg, run.info, run.sampler.shares
    if info.world_size > 1 and not cfg.parallel.compile:  # compiled blocks would trace the clock's hooks
        run.clock = ComputeClock(run.sharded.blocks, info.device)
    if shares is None:
        return
    split = ", ".join(f"{x:.3f}" for x in shares)
    if cfg.data.balance != "speed" or info.world_size == 1:
        log.info(f"data: balance: each step's tokens split between the ranks by the shares [{split}]")
        return
    run.balance = SpeedBalance(list(shares), every=cfg.data.balance_every)
    log.info(f"data: balance speed: each step's tokens split between the ranks by shares [{split}], measured "
             f"after step {run.balance.first} and every {run.balance.every} steps after it (compute time per token)")


def time_compute(run: Run, step: int, batches: list[dict]) -> None:
    """After optimizer step `step`: this rank's compute time and tokens into the run's totals and, under
    data.balance speed, into the window; on a measuring step the ranks' speeds are exchanged and the next step
    is split by the new shares (the same on every rank)."""
    seconds, tokens = run.clock.take(), sum(int(b["n_tokens"]) for b in batches)
    run.compute.add(step, seconds, tokens)
    bal = run.balance
    if bal is None:
        return
    bal.add(step, seconds, tokens)
    if not bal.due(step):
        return
    row = torch.tensor([bal.seconds, bal.tokens], dtype=torch.float64, device=run.info.device)
    gathered = distributed.all_gather_rows(row, run.info.world_size).tolist()
    shares = bal.update(gathered)
    run.sampler.shares = list(shares)
    speeds = ", ".join(f"{v:.0f}" for v in bal.measured[-1])
    log.info(f"balance: step {step}: compute speed per rank [{speeds}] tokens/s; shares of each step's tokens now "
             f"[{', '.join(f'{x:.3f}' for x in shares)}]")


# ----------------------------------------------------------------------------- one optimizer step


def forward_backward(run: Run, batches: list[dict], scale: torch.Tensor) -> torch.Tensor:
    """Forward and backward of this rank's micro-batches; returns, as one device tensor [2 + metrics], their
    summed loss, (MoE with an auxiliary loss) their summed router auxiliary loss, and the objective's metric sums.

    What is minimised: the objective's summed loss x scale (the global mean over units after FSDP's average over
    ranks) + router_aux_coef x aux / micro-batches per rank (after the average: the mean of every micro-batch's
    aux loss)."""
    cfg, device, model, obj = run.cfg, run.info.device, run.model, run.objective
    sums = torch.zeros(2 + len(obj.metrics), dtype=torch.float32, device=device)
    for i, b in enumerate(batches):
        if not cfg.parallel.sync_grads_every_micro_step:
            model.set_requires_gradient_sync(i == cfg.train.grad_accum_steps - 1)
        batch = to_device(b, device)
        # context parallelism: the full rows' positions, for the attention's mask, until backward has recomputed
        # any checkpointed block (model/ulysses.py)
        with ulysses.sequence(batch.pop("context_position_ids", None)):
            with moe.counting(run.expert_load):
                out = obj.loss(model, batch, run.loss_head, bool(run.router_aux_coef))
            run.tracker.phase("forward", i)
            minimised = out.loss * scale
            if out.router_aux is not None:
                minimised = minimised + out.router_aux * (run.router_aux_coef / len(batches))
                sums[1] += out.router_aux.detach()
            minimised.backward()
        run.tracker.phase("backward", i)
        sums[0] += out.loss.detach()
        for k, name in enumerate(obj.metrics):
            sums[2 + k] += out.metrics[name].detach()
    return sums


def skip_or_stop(run: Run, step: int, loss: float, norm: float, per_rank: list[float]) -> None:
    """A non-finite loss or gradient norm: stop naming the step and ranks, or (train.on_nonfinite skip) log it."""
    bad = [r for r, v in enumerate(per_rank) if not math.isfinite(v)]
    where = f"loss on rank(s) {bad}" if bad else "gradient norm (all ranks' losses finite)"
    if run.cfg.train.on_nonfinite == "stop":
        raise TrainingError(f"non-finite {where} at step {step}: loss={loss}, grad_norm={norm}; "
                            "lower train.lr, check the data, or set train.on_nonfinite=skip")
    log.info(f"step {step}: non-finite {where}; update skipped")


def longest_sequence(batch: dict) -> int:
    """The attention context of a micro-batch (MFU's attention term): its row width, or for rows laid end to end
    for flash attention (data/loader.py) the longest of their sequences, not the flattened width; under context
    parallelism the full row's width, not the chunk's."""
    if "context_position_ids" in batch:
        return int(batch["context_position_ids"].shape[1])
    return int(batch.get("max_length_q", batch["input_ids"].shape[1]))


def gradients_and_values(run: Run, batches: list[dict], stop: Optional[StopRequests]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward, backward and clipping of the step; its values stay on the device, unread: (counts: global units
    and input tokens, the gradient norm, rows: [rank, (loss sum, aux loss sum, metric sums, stop code)])."""
    info = run.info
    # One all_reduce: the objective's units (normaliser) and input tokens (throughput) of the whole step.
    counts = torch.tensor([sum(run.objective.units(b) for b in batches),
                           sum(int(b["n_tokens"]) for b in batches)], dtype=torch.float64, device=info.device)
    distributed.all_reduce_sum(counts)
    # The loss scale stays on the device: reading the counts here would make the CPU wait for the
    # previous step's optimizer before it could queue this step's forward.
    scale = (info.world_size / counts[0].clamp(min=1.0)).float()
    sums = forward_backward(run, batches, scale)
    grad_norm = grad_norm_and_clip(run.model, run.cfg.train.max_grad_norm).float()
    # The stop request rides in the step's all_gather (a fill with a host scalar: no copy, no sync).
    code = float(stop.local_code() if stop is not None else 0)
    rows = distributed.all_gather_rows(torch.cat([sums, sums.new_full((1,), code)]), info.world_size)
    return counts, grad_norm, rows


def read_values(counts: torch.Tensor, grad_norm: torch.Tensor, rows: torch.Tensor, n_metrics: int) -> list[float]:
    """The step's values on the host, in one device-to-host copy: global units, global input tokens, loss sum, grad
    norm, aux loss sum, metric sums, the largest stop code (float32 -> float64 is exact: what .item() gave)."""
    values = [counts[0], counts[1], rows[:, 0].sum().double(), grad_norm.double(), rows[:, 1].sum().double(),
              *(rows[:, 2 + k].sum().double() for k in range(n_metrics)), rows[:, -1].max().double()]
    return torch.stack(values).tolist()


def train_step(run: Run, batches: list[dict], t0: Optional[float] = None,
               stop: Optional[StopRequests] = None) -> StepStats:
    """One optimizer step over this rank's micro-batches; advances run.state. t0: when the step began
    (default: now; the loop passes the time before it waited for the batches). stop: this rank's stop requests,
    agreed over all ranks within the step's all_gather (StepStats.stop_code)."""
    t0 = time.perf_counter() if t0 is None else t0
    info, step = run.info, run.state.step + 1
    run.tracker.step_start(step, batches)
    counts, grad_norm, rows = gradients_and_values(run, batches, stop)
    lr = run.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
    must_stop = run.cfg.train.on_nonfinite == "stop"
    if must_stop:
        # A non-finite step ends the run (TrainingError) and nothing of it is saved, so the update can be queued
        # before the values are read: the device runs it while the host waits here, instead of idling while the
        # host launches it.
        run.optimizer.step()
        run.scheduler.step()
    values = read_values(counts, grad_norm, rows, len(run.objective.metrics))  # the step's one host sync
    targets_total, global_tokens, loss_sum, norm, aux_sum, *metric_sums, stop_code = values
    global_targets = max(1.0, targets_total)
    run.state.step, run.state.tokens_seen = step, run.state.tokens_seen + int(global_tokens)
    # whole-row units (pairs, examples) are counted by every rank of a context group (objectives/base.py)
    counted = run.cfg.parallel.context_parallel if run.objective.whole_rows else 1
    stats = StepStats(step, loss_sum / global_targets, norm, lr, int(global_tokens), int(global_targets) // counted,
                      max(longest_sequence(b) for b in batches), stop_code=int(stop_code))
    if run.router_aux_coef:
        stats.aux_loss = aux_sum / (info.world_size * len(batches))
    stats.metrics = metric_means(run.objective, metric_sums, global_targets)
    stats.skipped = not (math.isfinite(stats.loss) and math.isfinite(stats.grad_norm))
    if stats.skipped:
        skip_or_stop(run, step, stats.loss, stats.grad_norm, rows[:, 0].tolist())
    elif not must_stop:
        run.optimizer.step()
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if not stats.skipped:
        run.tracker.phase("optimizer")
    stats.seconds = time.perf_counter() - t0
    return stats


# ----------------------------------------------------------------------------- the loop


def record(run: Run, stats: StepStats, ev: Optional[EvalResult] = None) -> None:
    """The step's results: RunResult, and on log steps (and eval steps: `ev`, the evaluation after the step)
    metrics.jsonl / TensorBoard / progress and memory."""
    result, cfg = run.result, run.cfg
    if stats.skipped:
        result.skipped_steps += 1
        if ev is not None:  # the evaluation still counts: a record of its own
            run.logger.log(stats.step, ev.metrics())
        return
    result.losses.append(stats.loss)
    result.grad_norms.append(stats.grad_norm)
    result.step_times.append(stats.seconds)
    result.tokens.append(stats.tokens)
    result.steps = stats.step
    step = stats.step
    if not (step == 1 or step % cfg.logging.log_every == 0 or step == run.total_steps or ev is not None):
        return
    tok_s = stats.tokens / stats.seconds / run.info.world_size
    metrics = {"loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm, "tokens": stats.tokens,
               "target_tokens": stats.target_tokens, "step_time_s": stats.seconds, "tokens_per_s_per_device": tok_s}
    if stats.aux_loss is not None:
        metrics["aux_loss"] = stats.aux_loss
    metrics.update(stats.metrics)
    if run.expert_load is not None:  # every rank: one all_reduce
        load = moe.summarize(moe.take_counts(run.expert_load))
        metrics.update(load)
        if (warning := moe.imbalance_warning(step, load)) is not None:
            log.info(warning)
    if run.peak_tflops:
        flops = models.flops_per_token(run.hf_config, run.sharded.n_params, stats.seq_len)
        metrics["mfu"] = flops * tok_s / (run.peak_tflops * 1e12)
    if ev is not None:
        metrics.update(ev.metrics())
    metrics.update(run.tracker.gather(step, run.logger.tb))
    result.peak_mem_bytes = max(result.peak_mem_bytes, run.tracker.peak_bytes_max)
    run.logger.log(step, metrics)


def eval_due(run: Run, step: int) -> bool:
    """train.eval_every steps, and the last step, when there is eval data."""
    every = run.cfg.train.eval_every
    return run.eval_examples is not None and ((every > 0 and step % every == 0) or step == run.total_steps)


def evaluate_run(run: Run, step: int) -> EvalResult:
    """Evaluate after optimizer step `step` (collective): the eval line, the `eval` memory record; `record`
    writes its metrics with the step's."""
    cfg, info = run.cfg, run.info
    run.tracker.evaluating = True
    try:
        res = evaluate(run.model, run.objective, run.eval_examples, run.tokenizer.pad_token_id, info.device,
                       info.world_size, info.rank, eval_micro_batch(cfg), cfg.train.eval_max_batches, run.loss_head,
                       cfg.data.packing and cfg.model.attn_implementation == "flash_attention_2")
    finally:
        run.tracker.evaluating = False
    run.tracker.phase("eval")
    run.result.evals.append((step, res.loss))
    run.logger.eval_line(step, res.metrics(), res.units)
    run.checkpointer.note_eval(step, res.loss)
    return res


def finish(run: Run) -> None:
    """After the loop: the optional Hugging Face export and the summary line."""
    cfg, out, result = run.cfg, run.out, run.result
    if cfg.checkpoint.export_hf:
        export_hf(run.model, run.hf_config, run.tokenizer, out / "hf", run.info.is_main,
                  dtype=export_dtype(cfg.checkpoint.export_dtype, run.sharded.plan.precision),
                  max_shard_bytes=parse_size(cfg.checkpoint.export_max_shard_size, "checkpoint.export_max_shard_size"))
        log.info(f"export: Hugging Face model written to {out / 'hf'}")
    if run.clock is not None:  # every rank: one all_gather
        c = run.compute
        row = torch.tensor([c.seconds, c.tokens, c.steps], dtype=torch.float64, device=run.info.device)
        gathered = distributed.all_gather_rows(row, run.info.world_size).tolist()
        line = time_report(gathered, run.balance is not None)
        if line:
            log.info(line)
        if run.info.is_main:  # for `fsdptrain mem report`
            (run.out / "memory").mkdir(exist_ok=True)
            write_atomic(run.out / "memory" / COMPUTE_FILE,
                         json.dumps({"ranks": gathered, "balancing": run.balance is not None}) + "\n")
    if result.losses:
        log.info(f"done: {result.steps} steps, loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}, "
                 f"skipped {result.skipped_steps}; outputs in {out}")


def loop(run: Run) -> RunResult:
    """Step until total_steps, saving when due. A signal or the job's time limit saves and stops every rank at
    the next step boundary (RunStopped); an out-of-memory error stops every rank with a post-mortem."""
    cfg, pad_id = run.cfg, run.tokenizer.pad_token_id
    steps = pipeline.batches(cfg, run.sampler, run.examples, pad_id, run.state.step, run.total_steps,
                             run.info.device_type, run.context_index)
    stop = StopRequests(*job_deadline(cfg.checkpoint.save_before_minutes, cfg.checkpoint.wall_time_minutes,
                                      run.started))
    stopped: Optional[str] = None
    run.model.train()
    try:
        t0 = time.perf_counter()
        for batches in steps:
            with breakdown.track_step(cfg.memory, run.info, run.out, run.state.step + 1, run.model, run.optimizer,
                                      run.tracker, batches) as tracked:  # memory.breakdown_steps
                stats = train_step(run, batches, t0, stop=stop)
                tracked.seconds = stats.seconds
            if run.clock is not None:
                time_compute(run, stats.step, batches)
            ev = evaluate_run(run, stats.step) if eval_due(run, stats.step) else None
            if ev is not None and run.clock is not None:
                run.clock.take()  # the evaluation's forwards are no training step's compute
            record(run, stats, ev)
            stopped = stop.decide(stats.stop_code)  # agreed within the step's all_gather
            run.checkpointer.maybe_save(stats.step, last=stats.step == run.total_steps, force=stopped is not None)
            if run.lock is not None:
                run.lock.refresh()
            if stopped:
                break
            t0 = time.perf_counter()
        run.checkpointer.close()
    except BaseException as e:
        run.tracker.on_error(e, run.model, run.optimizer)  # OOM: post-mortem and stop every rank; else re-raised
        raise
    finally:
        stop.close()
        if run.clock is not None:
            run.clock.close()
        run.tracker.close()
        run.logger.close()
    if stopped and run.state.step < run.total_steps:
        msg = (f"stopped by {stopped} at step {run.state.step}; checkpoint saved to "
               f"{run.checkpointer.root / step_name(run.state.step)}; rerun the same command to continue")
        if run.info.is_main:
            rundir.note_stop(msg)
        raise RunStopped(msg)
    finish(run)
    return run.result


def release_memory(info: DistInfo) -> None:
    """Free what a finished run built. FSDP2's module state, its hooks and the modules form reference cycles, so
    the model, its parameters and the optimizer state outlive the run until a full garbage collection, which
    Python seldom runs on its own: a second train() in the same process (benchmarks, tests, notebooks) would
    start with the first run's memory still held."""
    gc.collect()
    if info.device_type == "cuda":
        torch.cuda.empty_cache()  # hand the freed blocks back, so the next run's peak and reserved are its own


def train(cfg: Config, examples: Optional[list[Example]] = None) -> RunResult:
    """Run training as configured. `examples` replaces the configured data (tests, notebooks). Everything the run
    built is freed when it returns or fails (release_memory)."""
    started = time.time()
    info = distributed.init(cfg.parallel.device, cfg.parallel.timeout_minutes)
    try:
        return _train(cfg, info, examples, started)  # the Run lives in _train's frame only
    except BaseException as e:
        # The traceback keeps the failed run's frames, and their locals the Run; the report (cli) needs only
        # the code and line numbers of those frames.
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        ulysses.use_group(None, 1)
        release_memory(info)
        distributed.shutdown(info)


def _train(cfg: Config, info: DistInfo, examples: Optional[list[Example]], started: float) -> RunResult:
    run = setup(cfg, info, examples)
    run.started = started
    try:
        return loop(run)
    finally:
        close_optimizer(run.optimizer)
        if run.lock is not None:
            run.lock.release()
