"""`fsdptrain estimate CONFIG --trace`: the real training step traced on fake tensors at the target world size.

The model is built by build.build_sharded_model (the same build training
uses: config sharding or hybrid mesh, precision, per-block checkpointing, the
chunked loss head, the optimizer) under FakeTensorMode with torch's fake
process group, so no memory is allocated and no GPU is needed. The trainer's
own `forward_backward` (accumulation, per-micro-step sync, loss scaling) and
`grad_norm_and_clip` then run two optimizer steps (the first has no optimizer
state yet), and torch's FSDPMemTracker attributes every live tensor to a
category; the peak of each phase is recorded (`measure_steps`, through
phases.PhaseTracker, the one wrapper around the tracker). Accumulation is
traced in at most 3 micro-steps per step: the first, one of the (identical)
middle ones and the last (`traced_micro_steps`). The same function measures real tensors on a real
process group, which is how the tests check the fake trace against reality.

What the trace does not model:
- The device is the CPU (fake): this torch build has no CUDA, and fake CUDA
  tensors cannot be copied across devices. The CUDA-side choices that change
  memory are made as on CUDA: the precision is resolved for the target device
  and AdamW is the fused kernel; attention runs the CPU's fused SDPA kernel,
  which saves the same output and log-sum-exp as CUDA's flash/efficient ones.
- CUDA-only memory (allocator caching and fragmentation, the CUDA context,
  NCCL buffers, kernel workspaces) stays the estimator's allowance line.
- parallel.cpu_offload (offloaded and resident memory are one device here)
  is refused in one line; the analytic estimate covers it. parallel.compile
  is traced eager and parallel.optimizer_offload with the state resident, then
  taken off (trace_notes says so under the table).
- Selective checkpointing is traced as trained: the profiler ops FSDP opens
  inside a block's recompute pass through the selective replay
  (parallelize._PROFILER_OPS).
- Context parallelism (parallel.context_parallel N) is traced as trained on
  one rank of a context group: its chunk of each row (the width padded to a
  multiple of lcm(8, N), over N), the Ulysses attention exchanging over a fake
  context group (all-to-alls on fake tensors move nothing but have the
  shapes), and for packed rows the whole row's document mask, made in the
  shape ulysses.document_mask makes it (`context_masks`: its values cannot be
  read on fake tensors).
- Preference runs (dpo, rm) are traced as trained: micro-batches of two rows
  per pair, and the reference built by build.build_reference (unfilled) and
  run by the objective; full fine-tuning's frozen copy is tracked with the
  policy (PhaseTracker `also`), freeze's kept shards are added to every phase
  (they are made before the tracker starts).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from ..config.schema import Config
from ..core.errors import ConfigError
from ..core.units import GIB, format_bytes
from ..dist import context
from ..dist.distributed import DistInfo
from ..dist.plan import budgets, resolve_precision
from ..model import ulysses
from ..objectives.choose import needs_reference_model, objective_for
from ..objectives.loss import install_chunked_loss
from ..train.build import Reference, ShardedModel, build_reference, build_sharded_model, reference_config
from ..train.optim import build_optimizer
from ..trainer import forward_backward, grad_norm_and_clip
from . import estimate as analytic
from .phases import CATEGORIES, PhasePeak, PhaseTracker, state_bytes

if TYPE_CHECKING:
    from transformers import PretrainedConfig

@dataclass
class StepTrace:
    """Per-phase peaks of the traced steps on one rank, and its exact optimizer state."""
    phases: list[PhasePeak]
    optimizer_state: int  # bytes of the optimizer's state tensors after the last step
    reference_weights: int = 0  # bytes of a preference run's reference weights (sharded copy, or kept shards)

    @property
    def compared(self) -> list[PhasePeak]:
        return [p for p in self.phases if not p.warmup]

    @property
    def peak(self) -> PhasePeak:
        return max(self.compared, key=lambda p: p.total)

    def category_max(self, name: str) -> int:
        return max(p.by_category.get(name, 0) for p in self.compared)


def measure_steps(model: nn.Module, optimizer: torch.optim.Optimizer, run: SimpleNamespace,
                  steps: list[list[dict]], max_grad_norm: float, also: tuple[nn.Module, ...] = ()) -> StepTrace:
    """Run optimizer steps (each a list of micro-batches) under a phases.PhaseTracker, one peak per phase.

    `run` carries what trainer.forward_backward reads (cfg, info.device, model, objective, loss_head); its
    `tracker` is replaced here by the phase recorder. `also`: other FSDP2 models the step runs (a preference
    run's reference copy), tracked with the model. Works on fake and on real tensors alike.
    """
    fake = _is_fake(steps[0])
    with PhaseTracker(model, optimizer, also=also) as pt:
        run.phase_tracker = pt
        step_no = [0]  # the step being traced, read by the phase records

        def close_phase(name: str, i: Optional[int] = None) -> None:
            pt.close(step_no[0], name, i, warmup=fake and step_no[0] == 1 and name == "optimizer")

        run.tracker = SimpleNamespace(phase=close_phase)
        for n, batches in enumerate(steps, start=1):
            step_no[0] = n
            targets = 1 if fake else sum(run.objective.units(b) for b in batches)
            scale = torch.tensor(run.info.world_size / max(1, targets), dtype=torch.float32, device=run.info.device)
            forward_backward(run, batches, scale)
            grad_norm_and_clip(model, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            close_phase("optimizer")
    return StepTrace(pt.phases, state_bytes(optimizer))


def traced_reference(cfg: Config, info: DistInfo, hf_config: PretrainedConfig, sharded: ShardedModel
                     ) -> tuple[Optional[Reference], tuple[nn.Module, ...], int]:
    """A preference run's reference as training builds it (build.build_reference, unfilled), the models the
    tracker must follow besides the policy (the frozen copy of full fine-tuning) and the bytes it keeps that no
    tracked model owns (freeze: the clones of the trainable shards as loaded, made before the tracker starts)."""
    if not needs_reference_model(cfg):
        return None, (), 0
    policy = sharded.model
    before = {id(p): p for p in policy.parameters() if p.requires_grad}
    reference = build_reference(cfg, info, hf_config, sharded, reference_config(cfg, hf_config), fill=False)
    also = reference_models(reference, policy)
    if also:
        return reference, also, 0
    if sharded.finetune is not None and sharded.finetune.method == "freeze":
        locals_ = [p.to_local() if hasattr(p, "to_local") else p for p in before.values()]
        return reference, (), sum(t.numel() * t.element_size() for t in locals_)  # clones of the unpadded shards
    return reference, (), 0


def forgetting(reference: Reference, run: SimpleNamespace) -> Reference:
    """`reference` after whose forward the phase tracker (run.phase_tracker, set by measure_steps) forgets the
    modules' per-forward records: FSDPMemTracker allows one forward of a root per iteration, and a LoRA or freeze
    run's reference forward runs the policy's own modules before their forward with gradients."""
    @contextmanager
    def traced(policy: nn.Module) -> Iterator[nn.Module]:
        with reference(policy) as model:
            yield model
        if (tracker := getattr(run, "phase_tracker", None)) is not None:  # none outside measure_steps
            tracker.forget_forwards()
    return traced


def reference_models(reference: Reference, policy: nn.Module) -> tuple[nn.Module, ...]:
    """The FSDP2 models a reference runs besides the policy (full fine-tuning's frozen copy; none for LoRA and
    freeze), lazily initialised as PhaseTracker does the policy: the reference is entered once outside any
    forward, where it yields its model and its tidying after a forward (which reads FSDP2's per-root state, made
    by the lazy init) changes nothing."""
    policy._get_fsdp_state()._lazy_init()
    context = reference(policy)
    model = context.__enter__()
    model._get_fsdp_state()._lazy_init()
    context.__exit__(None, None, None)
    return () if model is policy else (model,)


def sharded_bytes(model: nn.Module) -> int:
    """Bytes of an FSDP2 model's sharded parameters on this rank: each one's padded local storage."""
    return sum(p.to_local().untyped_storage().nbytes() for p in model.parameters())


def with_resident(tr: StepTrace, nbytes: int) -> StepTrace:
    """The trace with `nbytes` of sharded weights made before the tracker started (traced_reference) in every
    phase."""
    if not nbytes:
        return tr
    cat = "parameters (sharded)"
    return StepTrace([dataclasses.replace(p, total=p.total + nbytes, by_category={
        **p.by_category, cat: p.by_category[cat] + nbytes}) for p in tr.phases], tr.optimizer_state,
        tr.reference_weights)


def state_on_host(tr: StepTrace) -> StepTrace:
    """parallel.optimizer_offload: the trace of the resident optimizer with its state taken off every phase (the
    state lives in host memory; optimizer_state still gives its bytes, now the host's)."""
    phases = [dataclasses.replace(p, total=p.total - p.by_category["optimizer state"],
                                  by_category={**p.by_category, "optimizer state": 0}) for p in tr.phases]
    return StepTrace(phases, tr.optimizer_state, tr.reference_weights)


def step_run(cfg: Config, info: DistInfo, model: nn.Module, head,
             reference: Optional[Reference] = None) -> SimpleNamespace:
    """What trainer.forward_backward reads of a Run (its `tracker` is set by measure_steps); `reference`: a
    preference run's (train.build.build_reference). MoE expert-load counting (a few int64 counters) is left out:
    its hooks read routing values."""
    from ..model import moe

    run = SimpleNamespace(cfg=cfg, info=info, model=model, loss_head=head, expert_load=None,
                          router_aux_coef=moe.resolve_aux_coef(cfg.train.router_aux_loss_coef, model))
    run.objective = objective_for(cfg, forgetting(reference, run) if reference is not None else None)
    return run


def _is_fake(batches: list[dict]) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(v, FakeTensor) for b in batches for v in b.values())


# ----------------------------------------------------------------------------- the fake build


def check_traceable(cfg: Config, est: Optional[analytic.Estimate] = None) -> None:
    """parallel.cpu_offload cannot be traced (parameters and gradients move between host and device per unit,
    and the fake trace has one device); everything else can (see trace_notes for what is traced instead)."""
    if cfg.parallel.cpu_offload:
        raise ConfigError("parallel.cpu_offload: --trace cannot trace it (the fake trace runs on one device, so "
                          "offloaded and resident memory cannot be told apart); trace with "
                          "parallel.cpu_offload=false, or drop --trace for the analytic estimate, which covers it")


def trace_notes(cfg: Config) -> list[str]:
    """What is traced in place of what the config runs, one line each."""
    notes = []
    if cfg.parallel.compile:
        notes.append("parallel.compile: traced eager (the tracker does not see inside compiled graphs; what a "
                     "compiled block saves for backward is the compiler's choice, not modelled here)")
    if cfg.parallel.optimizer_offload:
        notes.append("parallel.optimizer_offload: traced with the state resident, then the optimizer state taken "
                     "off every phase (it lives in host memory; the CPU update makes no device temporaries)")
    return notes


def trace_config(cfg: Config, facts, gpu_memory: int) -> Config:
    """The config the fake build uses: precision resolved for the target device (the build runs on the CPU),
    the hybrid shard group explicit (no node check over a fake group), checkpointing auto planned for the
    target GPU's budget."""
    p = cfg.parallel
    changes = {"precision": resolve_precision(p.precision, facts.device_type), "device": "cpu",
               "compile": False, "optimizer_offload": False}  # see trace_notes
    train = dataclasses.replace(cfg.train, grad_accum_steps=traced_micro_steps(cfg))  # the last one syncs
    if p.sharding == "hybrid":
        changes["shard_group_size"] = facts.shard_group
    if p.activation_checkpointing == "auto":
        changes["memory_budget_gib"] = analytic.budget_bytes(min(budgets(p)), gpu_memory) / GIB  # the tightest
    return dataclasses.replace(cfg, parallel=dataclasses.replace(p, **changes), train=train)


def fake_batch(rows: int, width: int, vocab: int, packed: bool, kto: bool = False) -> dict:
    """A micro-batch in the loader's format (data/loader.collate; preference pairs: `rows` counts both rows of
    each pair, every token a target, which costs what a real pair batch does; kto: the examples' rows, then their
    KL rows, half of the examples desirable); made inside the fake mode."""
    b = {"input_ids": torch.randint(0, vocab, (rows, width)), "labels": torch.randint(0, vocab, (rows, width)),
         "n_tokens": torch.tensor(rows * width)}
    if packed:
        b["position_ids"] = torch.arange(width).expand(rows, width).contiguous()
    if kto:
        b["desirable"] = torch.arange(rows // 2) % 2 == 0
    return b


@contextmanager
def rows_unpacked(packed: bool) -> Iterator[None]:
    """transformers looks for packed sequences in position_ids unless it is tracing, and a fake tensor counts as
    tracing, so on fake tensors it would build the s x s mask a real unpacked batch never gets. Without
    data.packing every row is one sequence: answer as the real batch would."""
    from transformers import masking_utils

    real = masking_utils.find_packed_sequence_indices
    if not packed:
        masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = real


@contextmanager
def context_masks(packed: bool) -> Iterator[None]:
    """ulysses.document_mask reads the positions' values (where documents restart), which fake tensors do not
    have: answer as the real batch would, a [B, 1, S, S] mask for packed rows (they restart), none otherwise."""
    from ..model import ulysses

    real = ulysses.document_mask

    def shaped(position_ids: torch.Tensor) -> Optional[torch.Tensor]:
        if not packed:
            return None
        b, s = position_ids.shape
        return torch.ones(b, 1, s, s, dtype=torch.bool, device=position_ids.device).tril()

    ulysses.document_mask = shaped
    try:
        yield
    finally:
        ulysses.document_mask = real


def chunk_batch(batch: dict, n: int) -> dict:
    """A fake micro-batch of whole rows as one rank of a context group of `n` holds it (data/loader.py
    context_chunk): its chunk of the padded width (estimate.context_width), and the whole rows' positions."""
    rows, width = batch["input_ids"].shape
    full = analytic.context_width(width, n)
    out = fake_batch(rows, full // n, 2, False)  # (token values are not read)
    out["position_ids"] = torch.arange(full // n).expand(rows, full // n).contiguous()
    out["context_position_ids"] = torch.arange(full).expand(rows, full).contiguous()
    return out


def trace_rank(cfg: Config, hf_config: PretrainedConfig, world: int, gpus_per_node: int, rank: int,
               step_shapes: list[list[tuple[int, int]]], gpu_memory: int, target_device: str) -> StepTrace:
    """Build rank `rank`'s shards of the model on fake tensors under a fake process group of `world` ranks and
    trace steps whose micro-batches have the given (rows, width) shapes."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from ..dist.mesh import build_mesh

    facts = analytic.settings_from_config(cfg, world // gpus_per_node, gpus_per_node, gpu_memory,
                                          device_type=target_device).facts
    tcfg = trace_config(cfg, facts, gpu_memory)
    info = DistInfo(rank, rank % gpus_per_node, world, gpus_per_node, torch.device("cpu"), "fake", True)
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    n = cfg.parallel.context_parallel
    try:
        mesh = build_mesh(info, tcfg.parallel)  # outside the fake mode: the mesh's set-up reads real values
        ulysses.use_group(context.build_group(context.layout(n, world, rank)), n)  # N = 1: none
        with (FakeTensorMode(allow_non_fake_inputs=True), rows_unpacked(cfg.data.packing),
              context_masks(cfg.data.packing)):
            sharded = build_sharded_model(tcfg, info, hf_config, mesh=mesh, fill=False)
            reference, also, kept = traced_reference(tcfg, info, hf_config, sharded)
            head = install_chunked_loss(sharded.model, cfg.train.loss_chunk_tokens)
            optimizer = build_optimizer(sharded.model, cfg.train, fused=target_device == "cuda")
            packed = cfg.data.packing
            kto = cfg.train.objective == "kto"
            steps = [[fake_batch(r, w, hf_config.vocab_size, packed, kto) for r, w in shapes] for shapes in step_shapes]
            if n > 1:
                steps = [[chunk_batch(b, n) for b in batches] for batches in steps]
            run = step_run(tcfg, info, sharded.model, head, reference)
            sharded.model.train()
            tr = measure_steps(sharded.model, optimizer, run, steps, cfg.train.max_grad_norm, also)
            tr = with_resident(tr, kept)
            tr.reference_weights = kept + sum(sharded_bytes(m) for m in also)
            return state_on_host(tr) if cfg.parallel.optimizer_offload else tr
    finally:
        ulysses.use_group(None, 1)
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- ranks, comparison, rendering


def shard_index(rank: int, shard_world: int) -> int:
    """A rank's index in its shard group (mesh.build_mesh: full sharding, or rows of (replicate, shard))."""
    return rank % shard_world


def rank_groups(shape: analytic.ModelShape, world: int, shard_world: int) -> list[list[int]]:
    """Ranks grouped by identical shard sizes (FSDP2 pads dim 0 per rank, so the last ranks can hold less);
    one trace per group stands for all of its ranks."""
    groups: dict[tuple[int, int], list[int]] = {}
    for r in range(world):
        st = analytic.model_state(shape, shard_world, shard_index(r, shard_world), 4)
        groups.setdefault((st.local_numel, st.padded_numel), []).append(r)
    return list(groups.values())


# analytic term -> the traced category it is compared with
TERM_CATEGORY = {
    "parameters (sharded)": "parameters (sharded)",
    "reference weights (sharded, frozen)": "parameters (sharded)",  # tracked with the policy's (PhaseTracker also)
    "gradients (sharded)": "gradients (sharded)",
    "optimizer state (AdamW m, v, step)": "optimizer state",
    "all-gather: root (embeddings, norm, lm_head)": "parameters (gathered)",
    "all-gather: current + prefetched block": "parameters (gathered)",
    "all-gather: every block (no reshard)": "parameters (gathered)",
    "activations (saved for backward)": "activations",
    "unit gradient + reduce-scatter input": "gradients (unsharded)",
    "fp32 gradient accumulation (no sync)": "gradients (unsharded)",
}
EXACT = ("parameters (sharded)", "gradients (sharded)", "optimizer state")


def analytic_by_category(est: analytic.Estimate) -> dict[str, int]:
    out = dict.fromkeys(CATEGORIES, 0)
    for term, v in est.terms.items():
        out[TERM_CATEGORY.get(term, "temporaries")] += v
    return out


@dataclass
class RankTrace:
    ranks: list[int]  # the ranks this trace stands for (same shard sizes and micro-batch shapes)
    shapes: list[list[tuple[int, int]]]  # (rows, width) of each micro-batch, per traced step
    trace: StepTrace
    est: analytic.Estimate  # the analytic estimate for the first of `ranks`


@dataclass
class TraceReport:
    traces: list[RankTrace]
    seconds: float
    host_note: str = ""
    notes: list[str] = field(default_factory=list)


def traced_micro_steps(cfg: Config) -> int:
    """Micro-steps traced per optimizer step. Memory differs only between the first micro-step (no gradients
    yet), the ones after it, and with sync_grads_every_micro_step false the last (it reduces), so the middle
    ones, all alike, are traced once: N micro-steps are traced as min(N, 2) with per-micro-step sync, else
    min(N, 3)."""
    n = cfg.train.grad_accum_steps
    return min(n, 2 if cfg.parallel.sync_grads_every_micro_step else 3)


def config_shapes(s: analytic.Settings) -> list[list[tuple[int, int]]]:
    """Two steps of the config's micro-batch shape (the longest row from max_length / pack_length / token_budget)."""
    return [[(s.micro_batch, s.seq_len)] * traced_micro_steps(s.cfg) for _ in range(2)]


def load_hf_config(cfg: Config):
    from ..model import models

    vocab = None
    if cfg.model.path is None and "vocab_size" not in (cfg.model.hf_config or {}):
        from ..data.tokenizer import load_tokenizer

        vocab = len(load_tokenizer(cfg.model.tokenizer, cfg.model.path, cfg.model.trust_remote_code))
    hf = models.load_hf_config(cfg.model.path, cfg.model.hf_config if cfg.model.path is None else None, vocab,
                               cfg.model.trust_remote_code)
    if cfg.train.objective == "rm":  # the sequence-classification model (its pad id picks a token, costs nothing)
        hf = models.as_reward_config(hf, hf.pad_token_id or 0)
    return hf


def run_trace(cfg: Config, nnodes: int, gpus_per_node: int, gpu_memory: int, cpu_memory: Optional[int] = None,
              rank_shapes: Optional[dict[int, list[list[tuple[int, int]]]]] = None,
              progress: Callable[[str], None] = lambda _: None) -> TraceReport:
    """Trace one rank of every group of ranks with the same shard sizes (and, with `rank_shapes`, the same
    micro-batch shapes: rank -> steps of (rows, width)); default shapes: the config's micro-batch, two steps."""
    check_traceable(cfg)
    t0 = time.perf_counter()
    est = analytic.estimate(cfg, nnodes, gpus_per_node, gpu_memory, cpu_memory)
    check_traceable(cfg, est)
    s, world = est.settings, est.settings.world
    hf = load_hf_config(cfg)
    groups: dict[tuple, list[int]] = {}
    for ranks in rank_groups(est.shape, world, s.shard_world):
        for r in ranks:
            shapes = rank_shapes[r] if rank_shapes else config_shapes(s)
            groups.setdefault((ranks[0], repr(shapes)), []).append(r)
    out = []
    for ranks in groups.values():
        r = ranks[0]
        shapes = rank_shapes[r] if rank_shapes else config_shapes(s)
        progress(f"trace: rank {r} (stands for {len(ranks)} rank(s)), micro-batches {describe_shapes(shapes)}")
        tr = trace_rank(cfg, hf, world, gpus_per_node, r, shapes, gpu_memory, s.facts.device_type)
        e = est if shard_index(r, s.shard_world) == 0 else analytic.compute(est.shape, s, shard_index(r, s.shard_world))
        out.append(RankTrace(ranks, shapes, tr, e))
    notes = ([f"analytic column: the config's micro-batch ({s.micro_batch} x {s.seq_len}), not the data plan's"]
             if rank_shapes else []) + trace_notes(cfg)
    return TraceReport(out, time.perf_counter() - t0, notes=notes)


def describe_shapes(steps: list[list[tuple[int, int]]]) -> str:
    shapes = sorted({sh for step in steps for sh in step}, key=lambda x: (-x[0] * x[1], -x[1]))
    return ", ".join(f"{r} x {w}" for r, w in shapes)


def describe_ranks(ranks: list[int]) -> str:
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(map(str, ranks))


def _pct(a: int, b: int) -> str:
    return f"{(a - b) / b * 100:+.1f}%" if b and a <= 100 * b else "-"  # "-": nothing comparable was traced


def render_rank(rt: RankTrace) -> list[str]:
    tr, est = rt.trace, rt.est
    peak = tr.peak
    ana = analytic_by_category(est)
    lines = [f"{describe_ranks(rt.ranks)}: traced peak {format_bytes(peak.total)} at {peak.label}; "
             f"analytic peak {format_bytes(est.peak)} at {est.peak_phase} ({_pct(est.peak, peak.total)})",
             f"  {'category':<24} {'at traced peak':>14} {'traced max':>12} {'analytic':>12} {'difference':>12}"]
    for c in CATEGORIES:
        at, mx, a = peak.by_category.get(c, 0), tr.category_max(c), ana[c]
        if not (at or mx or a):
            continue
        diff = ("exact" if a == mx else format_bytes(a - mx)) if c in EXACT else _pct(a, mx)
        lines.append(f"  {c:<24} {format_bytes(at):>14} {format_bytes(mx):>12} {format_bytes(a):>12} {diff:>12}")
    lines.append(f"  {'total':<24} {format_bytes(peak.total):>14} {'':>12} {format_bytes(est.peak):>12} "
                 f"{_pct(est.peak, peak.total):>12}")
    lines.append("  traced phases (peak of each): " + "; ".join(
        f"{p.label} {format_bytes(p.total)}" for p in tr.phases if p.step == len(rt.shapes)))
    return lines


def render(rep: TraceReport) -> str:
    lines = ["", f"traced on fake tensors ({rep.seconds:.0f} s; the real step: build_sharded_model, the trainer's "
             "forward/backward, clipping and two optimizer steps; CPU fake device):"]
    for rt in rep.traces:
        lines += render_rank(rt)
    peaks = {r: rt.trace.peak for rt in rep.traces for r in rt.ranks}
    if len(rep.traces) > 1:
        top = max(peaks, key=lambda r: peaks[r].total)
        med = statistics.median(p.total for p in peaks.values())
        lines.append(f"imbalance: max/median traced peak = {peaks[top].total / med:.2f} (rank {top}: "
                     f"{format_bytes(peaks[top].total)} at {peaks[top].label}, median {format_bytes(med)})")
    lines.append("analytic working-memory rows are each term's own size (the terms are not all live at once); "
                 "not traced: allocator caching/fragmentation, CUDA context, NCCL buffers, kernel workspaces "
                 f"(the estimate's {analytic.RUNTIME_OVERHEAD / GIB:.0f} GiB + "
                 f"{int((analytic.FRAGMENTATION - 1) * 100)}% allowance)")
    lines += rep.notes
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- per-rank forecasts from the data


@dataclass
class RankPlan:
    """A rank's largest micro-batch of the first epoch (most padded tokens, then the widest) and where it is."""
    rank: int
    rows: int
    width: int
    step: int  # 1-based optimizer step of the first epoch
    micro: int  # its index in that step
    tokens: int  # the rank's real tokens over the epoch


def plan_ranks(cfg: Config, world: int, gpus_per_node: int,
               progress: Callable[[str], None] = lambda _: None) -> list[RankPlan]:
    """Every rank's micro-batch shapes over the first epoch, from the run's own data pipeline and sampler (under
    context parallelism the sampler deals to world / N data ranks, as in training: a context group's ranks read the
    same rows, each traced as its chunk)."""
    from ..data import pipeline
    from ..data.loader import padded
    from ..data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.tokenizer, cfg.model.path, cfg.model.trust_remote_code)
    examples = pipeline.load_examples(cfg, tokenizer, 0, 0, progress)
    lengths = pipeline.lengths_of(examples)
    flatten = cfg.data.packing and cfg.model.attn_implementation == "flash_attention_2"  # rows laid end to end
    per_item = pipeline.rows_per_item(cfg)  # a preference pair: its chosen and rejected rows
    out = []
    for r in range(world):
        lay = context.layout(cfg.parallel.context_parallel, world, r)
        sampler = pipeline.build_sampler(cfg, examples, lay.data_world, lay.data_rank, gpus_per_node)
        best, tokens = None, 0
        for step in range(sampler.steps_in_epoch(0)):
            for i, mb in enumerate(sampler.rank_micro_batches(step)):
                rows, width = len(mb) * per_item, padded(max(lengths[j] for j in mb))
                if flatten:
                    rows, width = 1, rows * width
                tokens += sum(lengths[j] for j in mb)
                if best is None or (rows * width, width) > (best.rows * best.width, best.width):
                    best = RankPlan(r, rows, width, step + 1, i, 0)
        best.tokens = tokens
        out.append(best)
    return out


def forecast_shapes(cfg: Config, plans: list[RankPlan]) -> dict[int, list[list[tuple[int, int]]]]:
    """Two steps of each rank's largest micro-batch (every micro-step of both)."""
    return {p.rank: [[(p.rows, p.width)] * traced_micro_steps(cfg)] * 2 for p in plans}


def render_forecast(rep: TraceReport, plans: list[RankPlan]) -> str:
    peak = {r: rt.trace.peak for rt in rep.traces for r in rt.ranks}
    med = statistics.median(p.total for p in peak.values())
    lines = ["", "per-rank forecast from the data plan (first epoch; each rank's largest micro-batch, traced):",
             f"  {'rank':>4} {'micro-batch':>12} {'at step':>8} {'epoch tokens':>13} {'predicted peak':>15}  phase"]
    for p in plans:
        pk = peak[p.rank]
        lines.append(f"  {p.rank:>4} {f'{p.rows} x {p.width}':>12} {f'{p.step} #{p.micro}':>8} {p.tokens:>13,} "
                     f"{format_bytes(pk.total):>15}  {pk.phase}")
    top = max(plans, key=lambda p: peak[p.rank].total)
    lines.append(f"imbalance: max/median predicted peak = {peak[top.rank].total / med:.2f}; rank {top.rank} peaks "
                 f"at step {top.step} (micro-batch {top.micro}: {top.rows} x {top.width} tokens) with "
                 f"{format_bytes(peak[top.rank].total)}, median {format_bytes(med)}")
    return "\n".join(lines) + "\n"
