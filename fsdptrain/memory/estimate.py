"""`fsdptrain estimate CONFIG`: per-rank memory of a run from the model config alone (meta device, no weights).

Two kinds of terms:
- Model state, exact. The model is built on the meta device and split into
  the same FSDP units as parallelize.apply_fsdp (one per block, the root keeps
  the rest). FSDP2 shards every parameter on dim 0 like torch.chunk: rank r
  holds rows [r*c, min((r+1)*c, d0)) with c = ceil(d0 / world) and allocates
  a padded c-row buffer; reduced gradients are one padded buffer per unit;
  AdamW's exp_avg / exp_avg_sq are zeros_like the local (unpadded) shard, plus
  a 4-byte `step` per parameter tensor.
- Working memory, modelled: unsharded all-gather buffers of the root (all
  through forward, and from the start of backward until its gradients are
  reduced at the end), of the current + prefetched block and of the last
  block (parallelize never reshards it after forward), unsharded
  gradients and the fp32 reduce-scatter input of a unit, fp32 gradient
  accumulation when gradients are reduced only on the last micro-step,
  activations saved per block (Llama-family block with flash/efficient SDPA;
  eager attention adds the s x s scores; a mixture-of-experts block saves its
  experts' MLP for top_k rows per token, the router and shared experts instead
  of a dense MLP: moe_mlp_bytes_per_token) for the checkpointing mode, and the
  logits spike (tokens x vocab: bf16 logits, fp32 copy, log-softmax and its
  gradient; with train.loss_chunk_tokens one chunk's logits plus the lm_head
  and hidden-state gradients the fused loss makes in forward). It follows
  parallel.sharding (hybrid: sharded within a shard group), prefetch_blocks,
  optimizer_offload and selective checkpointing (block input, matmul and
  attention outputs kept). Each block's backward is a phase of its own
  (block_backward_phases: what the earlier blocks keep, the block's saved
  tensors and its backward working set, the later blocks' reduced
  gradients); with lora / freeze, blocks before every trainable parameter
  save nothing. The peak is the largest of the phase sums in `phases`; the
  working-memory terms were checked against the fake-tensor trace of the real
  step (memory/trace.py, tests/test_estimate_vs_trace.py).
- Preference runs (train.objective dpo, rm): a micro-batch of n pairs is 2n
  rows; a run with a reference model (Settings.reference) adds its sharded
  weights to the model state (full fine-tuning: a frozen copy in the compute
  dtype; freeze: the trainable shards as loaded; LoRA: none, the policy with
  its adapters off) and its no-grad forward as a phase of its own (the units
  gathered as for the policy, one block's working set, then the logits'); rm's
  score head gives one output per token in place of the vocabulary logits.
- Context parallelism (parallel.context_parallel N): every sequence-scaled
  term is that of the rank's chunk (Settings.local_seq: the row padded to a
  multiple of lcm(8, N), over N); each block saves what the Ulysses attention
  adds (ulysses_saved_bytes_per_token), packed rows hold the whole rows'
  mask (document_mask_bytes) and one exchange's buffers are in flight; the model
  state is unchanged (context ranks are FSDP ranks). `communication` gives the
  bytes each rank sends per step: FSDP's all-gather and reduce-scatter, and
  the all-to-alls (printed under context parallelism only, so the CP=1 output
  is unchanged). docs/long-context.md has the checks.
The verdict adds a fixed allowance for the CUDA context, NCCL buffers and
allocator fragmentation that torch's allocator does not count.

`Settings` reads every option from the Config (plus plan.RunFacts, the
cluster); `plan_auto_checkpointing` is what the trainer runs for
parallel.activation_checkpointing: auto.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..config.schema import TWO_ROWS, Config, parse_size
from ..core.errors import UserError
from ..core.units import GIB, format_bytes, rank_ranges
from ..dist.plan import RunFacts, budgets, checkpoint_modes, describe_modes, per_rank, resolve_facts, resolve_precision
from ..train.staging import nvme_buffer_bytes, pinned_size, staging_bytes

if TYPE_CHECKING:
    import torch
    from torch import nn

ULYSSES_TERM = "Ulysses all-to-all buffers (one in flight)"
RUNTIME_OVERHEAD = 2 * GIB  # CUDA context + NCCL + allocator slack, outside torch.cuda.memory_allocated
FRAGMENTATION = 1.05


# ----------------------------------------------------------------------------- model shape (meta device)


@dataclass
class ModelShape:
    units: list[list[tuple[int, ...]]]  # parameter shapes per FSDP unit; blocks first, the root last
    unit_names: list[str]
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layers: int
    lm_head_numel: int
    n_params: int
    model_type: str
    moe: MoeShape | None = None  # mixture-of-experts blocks (None: dense)
    # per unit, per parameter (as in units): frozen by finetune lora / freeze (no gradient, no optimizer state,
    # stored in the compute dtype under bf16-mixed); empty: everything trains
    frozen: list[list[bool]] = dataclasses.field(default_factory=list)
    # per block, with lora / freeze: whether autograd records it (a trainable parameter in it or before it, the
    # embeddings included); a block before every trainable one saves nothing. Empty: every block.
    in_graph: list[bool] = dataclasses.field(default_factory=list)
    # per block: its norms' weights are frozen (lora), so their normalised inputs are not saved. Empty: none.
    frozen_norms: list[bool] = dataclasses.field(default_factory=list)
    lm_head_frozen: bool = False  # no lm_head gradient
    qk_norm: bool = False  # an RMSNorm on q and on k before RoPE (q_norm / k_norm: the qwen3 family)


@dataclass
class MoeShape:
    """What the estimator needs of a mixture-of-experts model (every expert's weights are ordinary parameters of
    the block's FSDP unit, so the model-state terms need nothing from here)."""
    experts: int
    top_k: int  # experts per token
    expert_intermediate: int  # one expert's MLP width
    shared_intermediate: int  # shared experts' total MLP width (every token), 0 without
    shared_gate: bool  # a sigmoid gate scales the shared experts' output (qwen2_moe)
    norm_topk: bool  # the router renormalises the top-k probabilities (saves them and their sum)
    moe_blocks: tuple[bool, ...]  # per block: routed experts (True) or a dense MLP


def moe_shape(model: nn.Module, blocks: list) -> MoeShape | None:
    """MoE dimensions from the experts modules (moe.expert_modules) and the config; None for a dense model."""
    from ..model import moe

    found = moe.expert_modules(model)
    if not found:
        return None
    experts = {id(m) for _, m, *_ in found}
    text = getattr(model.config, "get_text_config", lambda: model.config)()
    f_e = getattr(text, "moe_intermediate_size", None) or text.intermediate_size
    shared = getattr(text, "shared_expert_intermediate_size", None) or (
        (getattr(text, "n_shared_experts", None) or 0) * f_e)
    gate = any(name.endswith("shared_expert_gate") for name, _ in model.named_modules())
    return MoeShape(experts=max(e for *_, e in found), top_k=text.num_experts_per_tok, expert_intermediate=f_e,
                    shared_intermediate=shared, shared_gate=gate,
                    norm_topk=bool(getattr(text, "norm_topk_prob", True)),
                    moe_blocks=tuple(any(id(m) in experts for m in b.modules()) for b in blocks))


def shape_of_model(model: nn.Module) -> ModelShape:
    """FSDP units and dimensions of a (meta) transformers model, split like parallelize.apply_fsdp."""
    from ..model import models

    blocks = models.find_blocks(model)
    names = {id(m): n for n, m in model.named_modules()}
    seen: set[int] = set()
    frozen: list[list[bool]] = []

    def unclaimed_shapes(module) -> list[tuple[int, ...]]:  # each parameter goes to the first unit holding it
        params = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in module.parameters())
        frozen.append([not p.requires_grad for p in params])
        return [tuple(p.shape) for p in params]

    units = [unclaimed_shapes(b) for b in blocks]
    unit_names = [names.get(id(b), "block") for b in blocks]
    units.append(unclaimed_shapes(model))
    unit_names.append("root (embeddings, final norm, lm_head)")
    c = model.config
    text = getattr(c, "get_text_config", lambda: c)()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is model.get_input_embeddings().weight
    graph = model.get_input_embeddings().weight.requires_grad
    in_graph, frozen_norms = [], []
    for b in blocks:
        graph = graph or any(q.requires_grad for q in b.parameters())
        in_graph.append(graph)
        frozen_norms.append(any(not q.requires_grad for n, q in b.named_parameters()
                                if q.dim() == 1 and "norm" in n.rsplit(".", 2)[-2]))
    return ModelShape(units=units, unit_names=unit_names, hidden=text.hidden_size,
                      intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size), heads=heads,
                      kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim,
                      vocab=text.vocab_size, layers=len(blocks),
                      lm_head_numel=0 if (out is None or tied) else out.weight.numel(),
                      n_params=sum(math.prod(s) for u in units for s in u), model_type=c.model_type,
                      moe=moe_shape(model, blocks), frozen=frozen if any(f for u in frozen for f in u) else [],
                      in_graph=[] if all(in_graph) else in_graph,
                      frozen_norms=frozen_norms if any(frozen_norms) else [],
                      lm_head_frozen=out is not None and not out.weight.requires_grad,
                      qk_norm=any(n.endswith(("q_norm", "k_norm")) for b in blocks[:1] for n, _ in b.named_modules()))


def shape_from_config(cfg: Config) -> ModelShape:
    """Build the configured model on the meta device (no weights are read) and measure it."""
    import torch

    from ..model import models

    inline = cfg.model.hf_config if cfg.model.path is None else None
    vocab = None
    if cfg.model.path is None and "vocab_size" not in (inline or {}):  # the trainer takes it from the tokenizer
        from ..data.tokenizer import load_tokenizer

        vocab = len(load_tokenizer(cfg.model.tokenizer, cfg.model.path, cfg.model.trust_remote_code))
    hf = models.load_hf_config(cfg.model.path, inline, vocab, cfg.model.trust_remote_code)
    if cfg.train.objective == "rm":  # the sequence-classification model: a score head, no lm_head (the pad id
        hf = models.as_reward_config(hf, hf.pad_token_id or 0)  # only picks a token: no memory of its own)
    model = models.build_meta_model(hf, cfg.model.attn_implementation, torch.float32, cfg.model.trust_remote_code)
    if cfg.finetune.method != "full":  # adapters and frozen weights, as build_sharded_model makes them
        from ..model import finetune

        precision = resolve_precision(cfg.parallel.precision, "cpu" if cfg.parallel.device == "cpu" else "cuda")
        finetune.prepare(model, models.find_blocks(model), cfg.finetune, precision)
    return shape_of_model(model)


# ----------------------------------------------------------------------------- exact model-state terms


def shard_rows(d0: int, world: int, rank: int) -> tuple[int, int]:
    """(local rows, padded rows) of a dim-0 FSDP2 shard."""
    c = -(-d0 // world)
    return max(0, min(c, d0 - rank * c)), c


@dataclass
class ModelState:
    local_numel: int  # sum of this rank's unpadded shard sizes (DTensor.to_local().numel())
    padded_numel: int  # sum of the padded shard buffers FSDP2 allocates
    n_tensors: int
    params: int  # bytes
    grads: int
    optimizer: int
    trainable_numel: int = -1  # local elements of the trainable parameters (lora / freeze); -1: all of them

    @property
    def trained_local(self) -> int:
        return self.local_numel if self.trainable_numel < 0 else self.trainable_numel

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def model_state(shape: ModelShape, world: int, rank: int, param_bytes: int,
                frozen_bytes: int | None = None) -> ModelState:
    """frozen_bytes: bytes per frozen parameter (lora / freeze: 2 under bf16-mixed); default param_bytes. Frozen
    parameters have no gradient and no optimizer state."""
    local = padded = n = 0
    t_local = t_padded = t_n = 0  # the trainable ones
    for u, unit in enumerate(shape.units):
        for i, s in enumerate(unit):
            rest = math.prod(s[1:]) if len(s) > 1 else 1
            lr, pr = shard_rows(s[0], world, rank) if s else (1, 1)
            local += lr * rest
            padded += pr * rest
            n += 1
            if not (shape.frozen and shape.frozen[u][i]):
                t_local, t_padded, t_n = t_local + lr * rest, t_padded + pr * rest, t_n + 1
    fb = param_bytes if frozen_bytes is None else frozen_bytes
    return ModelState(local_numel=local, padded_numel=padded, n_tensors=n,
                      params=t_padded * param_bytes + (padded - t_padded) * fb,
                      grads=t_padded * param_bytes, optimizer=2 * t_local * param_bytes + 4 * t_n,
                      trainable_numel=t_local if shape.frozen else -1)


def cpu_offload_pinned_bytes(shape: ModelShape, world: int, rank: int, param_bytes: int, frozen_bytes: int,
                             pinned: bool) -> int:
    """Host bytes of parallel.cpu_offload's parameters and gradients on `rank`. FSDP2's CPUOffloadPolicy(pin_memory
    =True) pins each parameter's padded shard on its own, and copies each trainable one's reduced gradient (its
    unpadded shard, in the parameter's dtype) into memory it pins as it goes; CUDA's caching host allocator rounds
    every pinned request up to a power of two and keeps a freed gradient's block for the next step's. `pinned`
    False: the bytes themselves."""
    size = pinned_size if pinned else int
    total = 0
    for u, unit in enumerate(shape.units):
        for i, s in enumerate(unit):
            rest = math.prod(s[1:]) if len(s) > 1 else 1
            lr, pr = shard_rows(s[0], world, rank) if s else (1, 1)
            frozen = bool(shape.frozen and shape.frozen[u][i])
            total += size(pr * rest * (frozen_bytes if frozen else param_bytes))
            if not frozen:
                total += size(lr * rest * param_bytes)
    return total


def unit_numel(unit: list[tuple[int, ...]], world: int) -> int:
    """Unsharded (all-gathered, padded to world x c rows) elements of one unit."""
    total = 0
    for s in unit:
        rest = math.prod(s[1:]) if len(s) > 1 else 1
        total += shard_rows(s[0], world, 0)[1] * world * rest
    return total


def trainable_units(m: ModelShape) -> list[list[tuple[int, ...]]]:
    """Each unit's trainable parameter shapes (lora / freeze: frozen ones have no gradient to gather, reduce or
    accumulate); every parameter when nothing is frozen."""
    if not m.frozen:
        return m.units
    return [[shape for shape, frozen in zip(u, f) if not frozen] for u, f in zip(m.units, m.frozen)]


# ----------------------------------------------------------------------------- settings and working memory


@dataclass(frozen=True)
class Settings:
    """What the estimator reads of a run: the config (options are read from `cfg` where they are used; none is
    copied, so a new option is declared once, in config.py) and the resolved cluster facts. The properties are
    the values derived from both. Vary a setting by varying the config (`vary`). `cfg` is read, not copied: do
    not change it while the settings are in use."""
    cfg: Config
    facts: RunFacts
    block_modes: tuple[str, ...] | None = None  # checkpointing "auto": the planned mode of each block

    @property
    def world(self) -> int:
        return self.facts.world_size

    @property
    def seq_len(self) -> int:
        """The longest row a batch can hold."""
        d = self.cfg.data
        return (d.pack_length or d.max_length) if d.packing else d.max_length

    @property
    def context(self) -> int:
        """parallel.context_parallel N: ranks that split each row (1: off)."""
        return self.cfg.parallel.context_parallel

    @property
    def local_seq(self) -> int:
        """Positions of a row one rank holds: the whole row, or under context parallelism its 1/N chunk of the row
        padded as the loader pads it (`context_width`)."""
        n = self.context
        return self.seq_len if n == 1 else context_width(self.seq_len, n) // n

    @property
    def data_world(self) -> int:
        """Ranks that read different rows: world / N (a context group reads the same rows)."""
        return self.world // self.context

    @property
    def rows_per_unit(self) -> int:
        """Rows a micro-batch holds per example: 2 for preference pairs (dpo, rm: chosen and rejected rows of the
        pair's padded length in one forward), else 1."""
        return 2 if self.cfg.train.objective in TWO_ROWS else 1

    @property
    def micro_batch(self) -> int:
        """Rows of a micro-batch (a pair is two rows)."""
        k = self.rows_per_unit
        if self.cfg.data.token_budget:  # micro-batches cut by padded tokens: about budget / row length rows
            return k * max(1, self.cfg.data.token_budget // (k * self.seq_len))
        return k * self.cfg.train.micro_batch_size

    @property
    def reference(self) -> str | None:
        """How a preference run gets its reference model (train/build.py build_reference): "copy" (full fine-tuning:
        a second, frozen sharded model; preference.ref_model: the same under any method), "adapters-off" (lora: the
        policy with its adapters skipped), "initial"
        (freeze: the policy with a copy of its trainable shards as loaded swapped in), None (no reference: sft,
        rm, and the reference-free orpo and simpo losses)."""
        from ..objectives.choose import needs_reference_model

        if not needs_reference_model(self.cfg):
            return None
        if self.cfg.preference.ref_model:  # another folder: a frozen copy whatever the method
            return "copy"
        return {"full": "copy", "lora": "adapters-off", "freeze": "initial"}[self.cfg.finetune.method]

    @property
    def precision(self) -> str:  # resolved: bf16-mixed | bf16-pure | fp32
        return self.facts.precision

    @property
    def hybrid(self) -> bool:
        """parallel.sharding hybrid: parameters are sharded within a shard group and replicated across groups."""
        return self.cfg.parallel.sharding == "hybrid"

    @property
    def shard_world(self) -> int:
        """Ranks a parameter is sharded over."""
        return self.facts.shard_group

    def modes(self, n_blocks: int) -> list[str]:
        if self.cfg.parallel.activation_checkpointing == "auto":
            if self.block_modes is None:
                raise ValueError("checkpointing auto needs a plan (plan_checkpointing)")
            return list(self.block_modes)
        p = self.cfg.parallel
        return checkpoint_modes(n_blocks, p.activation_checkpointing, p.activation_checkpointing_k)

    def vary(self, **sections: dict) -> Settings:
        """These settings with config options changed, e.g. vary(parallel={"cpu_offload": True}); the config
        itself is not touched. The facts stay as resolved (change parallel.precision or sharding through
        settings_from_config instead)."""
        cfg = dataclasses.replace(self.cfg, **{name: dataclasses.replace(getattr(self.cfg, name), **changes)
                                               for name, changes in sections.items()})
        return dataclasses.replace(self, cfg=cfg)

    def with_plan(self, modes: list[str] | tuple[str, ...]) -> Settings:
        """Checkpointing auto with this per-block plan."""
        return dataclasses.replace(self.vary(parallel={"activation_checkpointing": "auto"}), block_modes=tuple(modes))


def items(s: Settings) -> str:
    """What a micro-batch's rows hold when an item is two rows: ' (2 pairs)', ' (2 examples and their KL rows)'."""
    n = s.micro_batch // 2
    if s.cfg.train.objective == "kto":
        return f" ({n} example{'s' if n > 1 else ''} and {'their' if n > 1 else 'its'} KL row{'s' if n > 1 else ''})"
    return f" ({n} pair{'s' if n > 1 else ''})"


def reference_kind(s: Settings) -> str:
    """How the run line names the reference model."""
    if s.reference == "copy" and s.cfg.preference.ref_model:
        return f"a frozen sharded copy of {s.cfg.preference.ref_model} (preference.ref_model)"
    return REFERENCE_KINDS[s.reference]


REFERENCE_KINDS = {
    None: "none",
    "copy": "a frozen sharded copy (full fine-tuning)",
    "adapters-off": "the policy with its adapters off (no second copy)",
    "initial": "the policy with its trainable shards as loaded swapped in",
}


def settings_from_config(cfg: Config, nnodes: int, gpus_per_node: int, gpu_memory: int,
                         cpu_memory: int | None = None, device_type: str | None = None) -> Settings:
    """device_type: where the run is (a running trainer knows); default: CUDA unless parallel.device is cpu."""
    device = device_type or ("cpu" if cfg.parallel.device == "cpu" else "cuda")
    return Settings(cfg, resolve_facts(cfg, nnodes * gpus_per_node, gpus_per_node, device, gpu_memory, cpu_memory))


def moe_mlp_bytes_per_token(e: MoeShape, h: int, c: int) -> int:
    """Bytes a routed-experts MLP saves per token in place of a dense MLP's 4 c f (transformers' default
    grouped_mm experts; checked against autograd's saved tensors in the tests, fp32).

    Each token goes through top_k experts, so the experts' gated MLP saves top_k x (4 c f_e) plus, per routed
    row, the gathered input and the expert's output (2 c h); the router saves its fp32 softmax (4 E), the top-k
    indices (int64) and per routed row three int64 permutation indices and the fp32 routing weight, and with
    renormalised top-k the chosen probabilities and their sum. Shared experts are a dense MLP on every token
    (4 c f_s), with a gate their output and the gate's sigmoid too.
    """
    k = e.top_k
    routed = k * (4 * c * e.expert_intermediate + 2 * c * h)
    router = 4 * e.experts + 8 * k + k * (3 * 8 + 4) + ((4 * k + 4) if e.norm_topk else 0)
    shared = 4 * c * e.shared_intermediate + ((c * h + 4) if e.shared_gate else 0)
    return routed + router + shared


def block_activation_bytes_per_token(m: ModelShape, c: int, attn: str, seq_len: int, routed: bool = False) -> int:
    """Bytes one decoder block saves for backward per token (c = compute dtype bytes); routed: a block whose MLP
    is routed experts (m.moe), see moe_mlp_bytes_per_token.

    Counted for a Llama-family block (RMSNorm, GQA attention, gated MLP) and
    checked tensor by tensor against autograd's saved tensors in the tests.
    """
    h, f, kvd, qd = m.hidden, m.intermediate, m.kv_heads * m.head_dim, m.heads * m.head_dim
    norms = 2 * (4 * h + 4 + 2 * c * h)  # fp32 input, rsqrt, normalised, weighted output (projections' input)
    qkv = c * (qd + 2 * kvd)  # q and k after RoPE, v: saved by attention
    attn_out = c * qd + 4 * m.heads  # output (also o_proj's input) and the fp32 log-sum-exp
    mlp = moe_mlp_bytes_per_token(m.moe, h, c) if (routed and m.moe) else 4 * c * f  # gate, up, act(gate), product
    total = norms + qkv + attn_out + mlp
    if m.qk_norm:  # per-head norms of q and k: fp32 input, rsqrt per head, normalised (RoPE saves only cos/sin)
        total += (4 + c) * (qd + kvd) + 4 * (m.heads + m.kv_heads)
    if attn == "eager":  # s x s probabilities (fp32 softmax output, and its cast when c < 4), full-head k/v copies
        total += m.heads * seq_len * (4 + (c if c < 4 else 0)) + 2 * c * (qd - kvd) - 4 * m.heads
    return total


def no_grad_block_bytes_per_token(m: ModelShape, c: int, attn: str, seq_len: int) -> int:
    """What a block's forward under no_grad (a reference model's) holds at its worst moment per token: the block's
    input and the normalised MLP input, and in the gated MLP act(gate), up and their product (3 c f; gate is
    freed once activated); a routed block's width is top_k experts' plus the shared experts'. Eager attention adds
    its s x s scores and probabilities. Nothing is kept for backward."""
    f = m.intermediate
    if m.moe and any(m.moe.moe_blocks):
        f = max(f, m.moe.top_k * m.moe.expert_intermediate + m.moe.shared_intermediate)
    eager = m.heads * seq_len * (4 + c) if attn == "eager" else 0
    return c * (3 * f + 2 * m.hidden) + eager


def reference_bytes(m: ModelShape, s: Settings, rank: int) -> int:
    """Bytes `rank` keeps for a preference run's reference model (Settings.reference). copy: every parameter's
    padded shard, frozen, in the compute dtype (build_sharded_model(frozen=True): bf16 under bf16-mixed, no
    gradient, no optimizer state); initial (freeze): a clone of each trainable parameter's local shard, in its
    storage dtype (finetune.InitialWeights); adapters-off (lora), none: nothing."""
    pb = 2 if s.precision == "bf16-pure" else 4
    if s.reference == "copy":
        c = 2 if s.precision.startswith("bf16") else 4
        frozen = dataclasses.replace(m, frozen=[[True] * len(u) for u in m.units])
        return model_state(frozen, s.shard_world, rank, pb, frozen_bytes=c).params
    if s.reference == "initial":
        return pb * model_state(m, s.shard_world, rank, pb).trained_local
    return 0


def context_width(width: int, n: int) -> int:
    """A row's width under context parallelism N: padded up to a multiple of lcm(8, N), so that it holds N equal
    chunks and each stays a multiple of 8 tokens where N allows (data/loader.py pads it so)."""
    step = math.lcm(8, n)
    return -(-width // step) * step


def ulysses_saved_bytes_per_token(m: ModelShape, c: int) -> int:
    """What a block saves per token under context parallelism on top of block_activation_bytes_per_token (checked
    against autograd's saved tensors in the tests): the Ulysses attention (model/ulysses.py) hands sdpa key and
    value repeated to every query head ([B, H/N, S, D], where transformers' sdpa on whole rows keeps the grouped
    heads: 2 c (q - kv) more), and its output in the head layout, which sdpa saves, is a tensor of its own beside
    the sequence-layout copy o_proj saves (c q more; on whole rows the two share storage)."""
    qd, kvd = m.heads * m.head_dim, m.kv_heads * m.head_dim
    return 2 * c * (qd - kvd) + c * qd


def ulysses_exchange_bytes_per_token(m: ModelShape, c: int) -> int:
    """The all-to-all's working set at its worst moment, per token of the rank's chunk: one exchange in flight
    (q, k, v and the output go one after the other, forward and backward alike), its receive buffer and the copy
    into the next layout, each the size of q ([B, H, S/N, D] = [B, H/N, S, D] elements) at most."""
    return 2 * c * m.heads * m.head_dim


def document_mask_bytes(s: Settings, c: int) -> int:
    """Packed rows under context parallelism: the Ulysses attention masks each document of the whole row with one
    additive mask in the compute dtype ([B, 1, S, S], ulysses.context_mask), made by the first block and saved by
    every block's sdpa, held from the first block's forward to the end of backward (checked against autograd in
    the tests): c B S^2 bytes on every rank of the group, whatever N, whatever the checkpointing. Rows that are
    not packed attend causally with no mask."""
    if not s.cfg.data.packing:
        return 0
    return c * s.micro_batch * (s.local_seq * s.context) ** 2


def exchanged_kv_width(m: ModelShape, n: int) -> int:
    """Elements per token of k (or v) that go through the all-to-all: the key/value heads when N divides them,
    else the heads repeated to one per query head first (model/ulysses.py)."""
    return (m.kv_heads if m.kv_heads % n == 0 else m.heads) * m.head_dim


def block_activation_bytes(m: ModelShape, c: int, attn: str, seq_len: int, tokens: int, routed: bool) -> int:
    """Bytes one block saves for a micro-batch of `tokens` tokens: per token, plus a routed block's int32 expert
    offsets (grouped_mm)."""
    per_block = 4 * m.moe.experts if (routed and m.moe) else 0
    return block_activation_bytes_per_token(m, c, attn, seq_len, routed) * tokens + per_block


def mlp_matmul_bytes_per_token(m: ModelShape, c: int, routed: bool) -> int:
    """Selective checkpointing keeps the MLP's matmul outputs: gate/up (2f) and down (h); routed experts do that for
    top_k rows per token, plus the shared experts and the router's probabilities."""
    if not (routed and m.moe):
        return c * (2 * m.intermediate + m.hidden)
    e = m.moe
    shared = c * (2 * e.shared_intermediate + m.hidden) if e.shared_intermediate else 0
    return e.top_k * c * (2 * e.expert_intermediate + m.hidden) + shared + 4 * e.experts


def block_backward_bytes_per_token(m: ModelShape, c: int, routed: bool = False) -> int:
    """What a block's backward allocates per token on top of its saved tensors, at its worst moment (measured
    op by op on CPU, fp32 and bf16): in the MLP's backward, the gradients of the product, of act(gate) and up,
    and of gate (3 c f) are live at once while the saved tensors are still held; later, in the fp32 RMSNorm's
    backward, about 20 h bytes are live but the MLP's saved tensors (4 c f) are already freed. A routed block's
    MLP width is top_k experts' plus the shared experts'."""
    f = (m.moe.top_k * m.moe.expert_intermediate + m.moe.shared_intermediate) if (routed and m.moe) else m.intermediate
    return max(3 * c * f, 20 * m.hidden - 4 * c * f)


@dataclass
class Estimate:
    settings: Settings
    shape: ModelShape
    state: ModelState
    terms: dict[str, int]  # GPU bytes per rank by term
    phases: dict[str, int]  # GPU bytes per rank at each phase's peak
    peak: int
    peak_phase: str
    cpu_per_rank: int
    cpu_per_node: int
    fits: bool
    advice: list[str] = field(default_factory=list)
    nvme_per_rank: int = 0  # optimizer_offload nvme: the AdamW state's file under parallel.offload_dir
    nvme_per_node: int = 0


def compute(m: ModelShape, s: Settings, rank: int = 0) -> Estimate:
    """Per-rank GPU memory by term and by phase for settings `s` (see the module docstring)."""
    p, t = s.cfg.parallel, s.cfg.train
    pb = 2 if s.precision == "bf16-pure" else 4  # sharded parameter / gradient / optimizer dtype
    c = 2 if s.precision.startswith("bf16") else 4  # compute (all-gather) dtype
    W = s.shard_world
    st = model_state(m, W, rank, pb, frozen_bytes=c)  # frozen weights are stored in the compute dtype
    blocks, root = m.units[:-1], m.units[-1]
    block_un = [unit_numel(u, W) for u in blocks]
    ahead = max(1, p.prefetch_blocks)  # FSDP2 prefetches one block implicitly; prefetch_blocks more
    two_blocks = sum(sorted(block_un, reverse=True)[:1 + ahead])  # the current block and the prefetched ones
    last_block = block_un[-1] if block_un else 0  # parallelize never reshards the last block after forward
    root_un = unit_numel(root, W)
    tokens = s.micro_batch * s.local_seq  # this rank's tokens: under context parallelism its chunk of each row
    routed = list(m.moe.moe_blocks) if m.moe else [False] * m.layers
    h = m.hidden
    V = 1 if t.objective == "rm" else m.vocab  # rm: the score head's one output per token, no vocabulary logits
    ulysses = ulysses_saved_bytes_per_token(m, c) * tokens if s.context > 1 else 0
    mask = document_mask_bytes(s, c) if s.context > 1 else 0  # one for the micro-batch, saved by every block
    saved = [block_activation_bytes(m, c, s.cfg.model.attn_implementation, s.seq_len, tokens, r) + ulysses
             - (2 * c * h * tokens if m.frozen_norms and m.frozen_norms[i] else 0)  # frozen norm weights
             if not m.in_graph or m.in_graph[i] else 0 for i, r in enumerate(routed)]
    a_block = max(saved, default=0)
    bw_block = max((block_backward_bytes_per_token(m, c, r) for r in routed), default=0) * tokens
    exchange = ulysses_exchange_bytes_per_token(m, c) * tokens if s.context > 1 else 0
    modes = s.modes(m.layers)

    def kept(mode: str, i: int) -> int:  # saved bytes of block i in a checkpointing mode
        if mode == "none" or not saved[i]:
            return saved[i]
        if mode == "full":
            return c * h * tokens  # the block input
        # block input + outputs of every matmul and of attention
        return (c * (2 * h + 2 * m.heads * m.head_dim + 2 * m.kv_heads * m.head_dim) + 4 * m.heads
                + mlp_matmul_bytes_per_token(m, c, routed[i])) * tokens

    kept_bytes = [kept(mode, i) for i, mode in enumerate(modes)]
    acts = sum(kept_bytes) + (4 * h + 4 + 2 * c * h) * tokens + mask  # + the final norm (the lm_head's input)
    recompute = a_block if any(mode != "none" for mode in modes) else 0
    root_buf = c * root_un  # gathered at the start of forward and again at the start of backward
    # After forward FSDP frees the gathered blocks (and the root, which parallelize shards with an explicit
    # reshard_after_forward) except the last block; with reshard_after_forward=false all of them stay.
    held_after_fwd = c * last_block if p.reshard_after_forward else c * (sum(block_un) + root_un)
    during_fwd = root_buf + (c * two_blocks if p.reshard_after_forward else c * sum(block_un))
    chunked = t.loss_chunk_tokens > 0  # the fused loss runs inside the model's forward, even as one chunk
    lt = min(t.loss_chunk_tokens, tokens) if chunked else tokens  # tokens whose logits exist at once
    logits_bf = c * V * lt  # lm_head output (compute dtype)
    if chunked:  # one chunk: compute-dtype logits + the fp32 softmax buffer (reused in place), then its cast
        logits_fwd = lt * V * (c + 4 if c == 2 else 4)
        logits_bwd = logits_grad = 0  # backward only scales the gradients made in forward
        fused_grads = c * V * h + c * h * tokens  # lm_head weight and hidden-state gradients, made in forward
    else:
        logits_fwd = lt * V * (c + 4 + 4 if c == 2 else 8)  # logits, fp32 copy, log-softmax output
        logits_bwd = lt * V * 12  # cross-entropy backward: fp32 gradient, softmax, output
        logits_grad = lt * V * (4 + c if c == 2 else 4)  # fp32 gradient and its cast, entering lm_head backward
        fused_grads = 0
    # unsharded root gradient, held until the root's reduce-scatter at the end
    lm_head_grad = 0 if m.lm_head_frozen else c * m.lm_head_numel
    grad_units = trainable_units(m)
    # a block's unsharded grad + reduce-scatter input (its trainable parameters only), fp32 unless reduce_dtype bf16
    rs = 2 if c == 2 and p.reduce_dtype == "bf16" else 4
    unit_grad = (c + rs) * max((unit_numel(u, W) for u in grad_units[:-1]), default=0)
    no_sync = t.grad_accum_steps > 1 and not p.sync_grads_every_micro_step
    accum = 4 * sum(unit_numel(u, W) for u in grad_units) if no_sync else 0
    params_gpu = 0 if p.cpu_offload else st.params
    grads_gpu = 0 if p.cpu_offload else st.grads
    opt_gpu = 0 if (p.cpu_offload or p.optimizer_offload) else st.optimizer
    offload_staging = pb * 2 * max((unit_numel(u, W) // W for u in m.units), default=0) if p.cpu_offload else 0
    # a preference run's reference model: its weights (on the host with cpu_offload, as the policy's shards), and
    # its no-grad forward at the start of each micro-step, before the policy's: the same units gathered as in the
    # policy's forward, one block's working set, the log-prob working set; nothing saved for backward
    ref_bytes = reference_bytes(m, s, rank)
    ref_gpu = 0 if p.cpu_offload else ref_bytes
    ref_work = 0
    if s.reference:  # a block's working set, then (the block's freed) the logits, their fp32 copy, the log-softmax
        ref_work = (max(no_grad_block_bytes_per_token(m, c, s.cfg.model.attn_implementation, s.seq_len),
                        V * (c + 4 + 4 if c == 2 else 8)) * tokens
                    + (0 if s.reference != "initial" else pb * st.trained_local))  # the current shards, put aside
    terms = {
        "parameters (sharded)": params_gpu,
        "gradients (sharded)": grads_gpu,
        "optimizer state (AdamW m, v, step)": opt_gpu,
        "reference weights (sharded, frozen)": ref_gpu,
        "all-gather: root (embeddings, norm, lm_head)": root_buf,
        ("all-gather: current + prefetched block" if p.reshard_after_forward
         else "all-gather: every block (no reshard)"): c * (two_blocks if p.reshard_after_forward else sum(block_un)),
        "offload staging (H2D shards)": offload_staging,
        "activations (saved for backward)": acts,
        "recompute of one block (checkpointing)": recompute,
        "backward working set (one block)": bw_block,
        ULYSSES_TERM: exchange,
        "unit gradient + reduce-scatter input": unit_grad,
        "fp32 gradient accumulation (no sync)": accum,
        "logits + loss (forward)": logits_fwd,
        "logits + loss (backward)": logits_bwd,
        "lm_head + hidden grads (fused loss)": fused_grads,
        "reference forward (no grad)": ref_work,
    }
    base = params_gpu + opt_gpu + offload_staging + accum + ref_gpu  # fused AdamW on CUDA: no full-size temporaries
    if chunked:  # the chunked loss runs inside the model's forward and backward: the root stays gathered
        held_after_fwd = max(held_after_fwd, root_buf + c * last_block)
    # accumulating with per-micro-step sync, the micro-steps after the first hold the reduced gradients
    fwd = base + (grads_gpu if t.grad_accum_steps > 1 and p.sync_grads_every_micro_step else 0)
    phases = {
        **({"forward (reference, no grad)": fwd + during_fwd + ref_work} if s.reference else {}),
        "forward (lm_head)": fwd + during_fwd + acts + logits_bf,
        "forward (loss)": fwd + held_after_fwd + acts + logits_fwd + fused_grads,
        "backward (loss)": fwd + held_after_fwd + acts + logits_bwd + fused_grads,
        "backward (lm_head)": fwd + max(held_after_fwd, root_buf + c * last_block) + acts + logits_grad + lm_head_grad,
        **block_backward_phases(m, s, rank, st, kept_bytes, saved, tokens,
                                base + root_buf + lm_head_grad + c * two_blocks + c * max(block_un, default=0)
                                + exchange + mask),
        "backward (root reduce)": base + grads_gpu + root_buf + (c + rs) * unit_numel(grad_units[-1], W),
        "optimizer": base + grads_gpu,
    }
    peak_phase = max(phases, key=phases.get)
    peak = phases[peak_phase]
    cpu_rank = 0
    # optimizer_offload keeps AdamW's state in fp32 whatever the parameters' dtype (train.optim_offload)
    offloaded_state = model_state(m, W, rank, 4).optimizer if p.optimizer_offload else st.optimizer
    if p.cpu_offload:  # the pinned shards and gradients, AdamW's state (fused CPU AdamW: no full-size temporary)
        pinned = s.facts.device_type == "cuda"
        if s.reference == "copy":  # its frozen shards pinned the same way
            ref_bytes = cpu_offload_pinned_bytes(dataclasses.replace(m, frozen=[[True] * len(u) for u in m.units]),
                                                 W, rank, pb, c, pinned)
        cpu_rank = cpu_offload_pinned_bytes(m, W, rank, pb, c, pinned) + st.optimizer + ref_bytes
    elif p.optimizer_offload == "nvme":  # the stream's buffers only; the state on the drive
        buffer_bytes = parse_size(p.offload_buffer_size, "parallel.offload_buffer_size")
        cpu_rank = nvme_buffers(m, W, rank, buffer_bytes, s.facts.device_type == "cuda")
    elif p.optimizer_offload:  # state + the persistent host buffers (gradient, shard), pinned on CUDA
        cpu_rank = offloaded_state + offload_staging_bytes(m, W, rank, s.facts.device_type == "cuda")
    nvme_rank = offloaded_state if p.optimizer_offload == "nvme" and not p.cpu_offload else 0
    fits = peak * FRAGMENTATION + RUNTIME_OVERHEAD <= s.facts.gpu_memory
    if cpu_rank and s.facts.cpu_memory is not None:
        fits = fits and cpu_rank * s.facts.gpus_per_node <= s.facts.cpu_memory
    return Estimate(settings=s, shape=m, state=st, terms=terms, phases=phases, peak=peak, peak_phase=peak_phase,
                    cpu_per_rank=cpu_rank, cpu_per_node=cpu_rank * s.facts.gpus_per_node, fits=fits,
                    nvme_per_rank=nvme_rank, nvme_per_node=nvme_rank * s.facts.gpus_per_node)


def local_groups(m: ModelShape, world: int, rank: int) -> list[list[int]]:
    """The local sizes of `rank`'s trainable shards by optimizer group (weights with decay, 1-D tensors without).
    Parameters in the units' order: the root's come last here and first in the model, which moves a few chunk
    boundaries, not the totals much."""
    groups: dict[bool, list[int]] = {True: [], False: []}
    for unit in trainable_units(m):
        for shape in unit:
            rows = shard_rows(shape[0], world, rank)[0] if shape else 1
            groups[len(shape) >= 2].append(rows * math.prod(shape[1:]))
    return list(groups.values())


def offload_staging_bytes(m: ModelShape, world: int, rank: int, pinned: bool) -> int:
    """Host bytes of optimizer_offload's staging buffers on `rank`: per parameter group one flat fp32 gradient and
    one shard buffer per chunk of at most 64 MiB, each rounded up to a power of two by CUDA's pinned allocator
    (train.optim_offload)."""
    return sum(staging_bytes(numels, pinned) for numels in local_groups(m, world, rank))


def nvme_buffers(m: ModelShape, world: int, rank: int, buffer_bytes: int, pinned: bool) -> int:
    """Host bytes of optimizer_offload nvme's stream buffers on `rank`, all it holds in host memory (the moments'
    part unpinned, the staging's pinned on CUDA; train.optim_nvme)."""
    return nvme_buffer_bytes(local_groups(m, world, rank), buffer_bytes, pinned)


def block_backward_phases(m: ModelShape, s: Settings, rank: int, st: ModelState, kept_bytes: list[int],
                          saved: list[int], tokens: int, fixed: int) -> dict[str, int]:
    """The backward of each block, last to first: the blocks before it keep what they saved, this block holds all
    it saves (kept, or recomputed by checkpointing) plus its backward working set (block_backward_bytes_per_token),
    and the blocks after it have reduced their sharded gradients (all of them are held from the previous
    micro-step when accumulating with per-micro-step sync). `fixed`: what every block's backward holds (model
    state, the root's gathered parameters and lm_head gradient, the gathered blocks, the unit's unsharded gradient:
    its fp32 reduce-scatter input comes after the block's backward, when the working set is gone)."""
    p, t = s.cfg.parallel, s.cfg.train
    pb = 2 if s.precision == "bf16-pure" else 4
    c = 2 if s.precision.startswith("bf16") else 4
    routed = list(m.moe.moe_blocks) if m.moe else [False] * m.layers
    accumulated = t.grad_accum_steps > 1 and p.sync_grads_every_micro_step and not p.cpu_offload
    out: dict[str, int] = {}
    later_grads = 0  # sharded gradients of the blocks after i, reduced already
    for i in reversed(range(m.layers)):
        grads = st.grads if accumulated else later_grads
        work = saved[i] + (block_backward_bytes_per_token(m, c, routed[i]) * tokens if saved[i] else 0)
        out[f"backward (block {i})" if i < m.layers - 1 else "backward (last block)"] = (
            fixed + sum(kept_bytes[:i]) + work + (0 if p.cpu_offload else grads))
        unit = dataclasses.replace(m, units=[m.units[i]], frozen=[m.frozen[i]] if m.frozen else [])
        later_grads += model_state(unit, s.shard_world, rank, pb).grads
    # the block whose backward is the largest stands for all (the phase list stays short)
    worst = max(out, key=out.get, default=None)
    return {worst: out[worst]} if worst else {}


@dataclass
class Communication:
    """Bytes one rank sends per optimizer step, by collective (each receives as much). A ring collective over g
    ranks sends (g - 1) / g of the gathered (or reduced) tensor per rank; an all-to-all over N ranks sends the
    (N - 1) / N of its tensor that belongs to the others."""
    all_gather: int  # FSDP: parameters, compute dtype
    reduce_scatter: int  # FSDP: gradients, reduce dtype
    all_reduce: int  # hybrid sharding: the reduced gradient shards across replicas (2 (R - 1) / R of a shard)
    all_to_all: int  # context parallelism (Ulysses): q, k, v and the output, and their gradients
    exchanges: int  # all-to-alls per micro-step (4 per block forward, 4 backward, 4 per recomputed block)


def communication(est: Estimate) -> Communication:
    """Per-rank traffic of a step of `est`'s settings. FSDP gathers every unit in forward and, resharded after it,
    again in backward (all but the last block, which parallelize keeps gathered; none without
    reshard_after_forward); it reduce-scatters the trainable gradients on every micro-step (or only the last
    without sync_grads_every_micro_step). Context parallelism exchanges q, k, v (key/value heads as exchanged:
    exchanged_kv_width) and the attention output in each block's forward, their gradients in its backward, and a
    checkpointed block's forward again when it is recomputed. Blocks before every trainable parameter (lora,
    freeze: ModelShape.in_graph) run no backward: gathered and exchanged in forward only."""
    s, m = est.settings, est.shape
    p, t = s.cfg.parallel, s.cfg.train
    c = 2 if s.precision.startswith("bf16") else 4
    rs = 2 if c == 2 and p.reduce_dtype == "bf16" else 4
    W, n, micro = s.shard_world, s.context, t.grad_accum_steps
    ring = (W - 1) / W
    units = [unit_numel(u, W) for u in m.units]
    blocks, root = units[:-1], units[-1]
    graph = m.in_graph or [True] * m.layers
    backward = (sum(b for b, g in zip(blocks[:-1], graph) if g) + root) if p.reshard_after_forward else 0
    gather = c * ring * (sum(units) + backward) * micro
    reduces = micro if p.sync_grads_every_micro_step else 1
    grads = sum(unit_numel(u, W) for u in trainable_units(m))
    scatter = rs * ring * grads * reduces
    replicas = s.world // W
    allreduce = rs * 2 * (replicas - 1) / replicas * (grads / W) * reduces if replicas > 1 else 0
    a2a, exchanges = 0.0, 0
    if n > 1:
        tokens = s.micro_batch * s.local_seq
        per_block = c * tokens * (2 * m.heads * m.head_dim + 2 * exchanged_kv_width(m, n)) * (n - 1) / n
        passes = sum((3 if mode != "none" else 2) if g else 1  # forward, backward, recompute
                     for mode, g in zip(s.modes(m.layers), graph))
        a2a, exchanges = per_block * passes * micro, 4 * passes
    return Communication(int(gather), int(scatter), int(allreduce), int(a2a), exchanges)


def render_communication(est: Estimate) -> list[str]:
    """The communication lines of `render` (under context parallelism: the all-to-alls beside FSDP's)."""
    s = est.settings
    k = communication(est)
    lines = ["", "communication per rank per optimizer step (bytes sent; as many received):",
             f"  {'FSDP all-gather (parameters)':<44} {format_bytes(k.all_gather):>12}",
             f"  {'FSDP reduce-scatter (gradients)':<44} {format_bytes(k.reduce_scatter):>12}"]
    if k.all_reduce:
        lines.append(f"  {'all-reduce across replicas (hybrid)':<44} {format_bytes(k.all_reduce):>12}")
    lines.append(f"  {'context-parallel all-to-all (Ulysses)':<44} {format_bytes(k.all_to_all):>12}  "
                 f"({k.exchanges} per micro-step over {s.context} ranks, x{s.cfg.train.grad_accum_steps} "
                 "micro-steps)")
    return lines


def budget_bytes(budget_gib: float, gpu_memory: int) -> int:
    """The peak allocated bytes a plan may reach: the configured budget, or what `fits` allows on the GPU."""
    if budget_gib > 0:
        return int(budget_gib * GIB)
    return int((gpu_memory - RUNTIME_OVERHEAD) / FRAGMENTATION)


def candidate_plans(n_blocks: int) -> list[list[str]]:
    """Per-block checkpointing from the least recomputation to the most: blocks turn selective one by one
    (recomputing only element-wise ops), then full; from block 0 on, so the last blocks, whose backward comes
    right after forward, are the last to pay for recomputation."""
    plans = [["selective"] * j + ["none"] * (n_blocks - j) for j in range(n_blocks + 1)]
    return plans + [["full"] * j + ["selective"] * (n_blocks - j) for j in range(1, n_blocks + 1)]


def plan_checkpointing(m: ModelShape, s: Settings, budget: int) -> tuple[list[str], Estimate]:
    """The first candidate plan whose estimated peak is within `budget` (all full when none is)."""
    est = None
    for modes in candidate_plans(m.layers):
        est = compute(m, s.with_plan(modes))
        if est.peak <= budget:
            return modes, est
    return modes, est


def advise(m: ModelShape, est: Estimate) -> list[str]:
    """Changes that would make the run fit (or fit with more room), each with its estimated peak."""
    s = est.settings
    tries: list[tuple[str, Settings]] = []

    def mode(m: str) -> Settings:
        return dataclasses.replace(s.vary(parallel={"activation_checkpointing": m}), block_modes=None)

    if s.cfg.parallel.activation_checkpointing != "full":
        tries.append(("parallel.activation_checkpointing=full", mode("full")))
    if s.cfg.parallel.activation_checkpointing in ("none", "every_k"):
        tries.append(("parallel.activation_checkpointing=selective", mode("selective")))
    tokens = s.micro_batch * s.seq_len
    # (dpo and rm refuse the chunked loss: their objectives read every row's logits or scores themselves)
    if not s.cfg.train.loss_chunk_tokens and tokens >= 2048 and s.cfg.train.objective not in TWO_ROWS:
        chunk = min(4096, tokens // 2)
        tries.append((f"train.loss_chunk_tokens={chunk}", s.vary(train={"loss_chunk_tokens": chunk})))
    if s.cfg.train.grad_accum_steps > 1 and not s.cfg.parallel.sync_grads_every_micro_step:
        tries.append(("parallel.sync_grads_every_micro_step=true",
                      s.vary(parallel={"sync_grads_every_micro_step": True})))
    if not s.cfg.parallel.reshard_after_forward:
        tries.append(("parallel.reshard_after_forward=true", s.vary(parallel={"reshard_after_forward": True})))
    units = s.micro_batch // s.rows_per_unit  # examples (pairs: two rows each) per micro-batch
    if units > 1:  # half the rows of a micro-batch as it is now (so not cut by data.token_budget)
        half = units // 2
        tries.append((f"train.micro_batch_size={half} train.grad_accum_steps={s.cfg.train.grad_accum_steps * 2}",
                      s.vary(train={"micro_batch_size": half, "grad_accum_steps": s.cfg.train.grad_accum_steps * 2},
                             data={"token_budget": None})))
    if not s.cfg.parallel.cpu_offload and not s.cfg.parallel.optimizer_offload:
        tries.append(("parallel.optimizer_offload=true", s.vary(parallel={"optimizer_offload": True})))
    if not s.cfg.parallel.cpu_offload:
        tries.append(("parallel.cpu_offload=true", s.vary(parallel={"cpu_offload": True})))
    wider = 2 * s.context  # under context parallelism: twice the ranks per row, if they divide the world and heads
    if s.context > 1 and s.world % wider == 0 and m.heads % wider == 0:
        tries.append((f"parallel.context_parallel={wider}", s.vary(parallel={"context_parallel": wider})))
    if s.seq_len > 512:  # rows of half the length, as many of them as now
        tries.append((f"data.max_length={s.seq_len // 2}",
                      s.vary(data={"max_length": s.seq_len // 2, "packing": False, "token_budget": None},
                             train={"micro_batch_size": units})))
    out = []
    for label, alt in tries:
        e = compute(m, alt)
        if e.peak < est.peak:
            out.append(f"{label}: peak {format_bytes(e.peak)} (-{format_bytes(est.peak - e.peak)})"
                       f"{'  fits' if e.fits else ''}")
    if not est.fits:
        nodes = s.world // max(1, s.facts.gpus_per_node)
        f = s.facts
        for more in range(nodes + 1, 4 * nodes + 1):  # (hybrid sharding: more nodes do not shard further)
            if s.hybrid:
                break
            e = compute(m, dataclasses.replace(s, facts=resolve_facts(
                s.cfg, more * f.gpus_per_node, f.gpus_per_node, f.device_type, f.gpu_memory, f.cpu_memory)))
            if e.fits:
                out.append(f"{more} nodes x {s.facts.gpus_per_node} GPUs: peak {format_bytes(e.peak)}  fits")
                break
    return out


def render(est: Estimate) -> str:
    s, m = est.settings, est.shape
    p, t = s.cfg.parallel, s.cfg.train
    nodes = s.world // max(1, s.facts.gpus_per_node)
    count = f"{m.n_params / 1e9:.2f}B" if m.n_params >= 1e9 else f"{m.n_params / 1e6:.2f}M"
    lines = [(f"model: {m.model_type}, {count} parameters, {m.layers} blocks, hidden {m.hidden}, "
              f"vocab {m.vocab}"),
             *([f"experts: {m.moe.experts} per MoE block ({sum(m.moe.moe_blocks)} of {m.layers} blocks), top-"
                f"{m.moe.top_k} per token, expert width {m.moe.expert_intermediate}"
                + (f", shared experts width {m.moe.shared_intermediate}" if m.moe.shared_intermediate else "")]
              if m.moe else []),
             f"run: {nodes} node(s) x {s.facts.gpus_per_node} GPUs = {s.world} ranks, precision {s.precision}, "
             f"micro-batch {s.micro_batch} x {s.seq_len} tokens"
             + (items(s) if s.rows_per_unit == 2 else "")
             + f", grad accumulation {t.grad_accum_steps}, "
             f"checkpointing {p.activation_checkpointing}"
             + (f" ({describe_modes(list(s.block_modes))})" if s.block_modes else "") + f", offload {p.cpu_offload}"
             + (", optimizer offload to NVMe" if p.optimizer_offload == "nvme"
                else ", optimizer offload" if p.optimizer_offload else "")
             + (f", loss chunks of {t.loss_chunk_tokens} tokens" if t.loss_chunk_tokens else "")
             + (f", hybrid sharding over {s.shard_world} ranks" if s.hybrid else "")
             + (f", context parallel {s.context}: {s.local_seq} tokens of each row per rank, {s.data_world} "
                f"data-parallel group(s), {s.data_world * s.micro_batch * t.grad_accum_steps * s.seq_len} tokens "
                "per step" if s.context > 1 else ""),
             *([f"objective: {t.objective}" + (f" ({s.cfg.preference.loss})" if t.objective == "dpo" else "")
                + ", reference model: " + reference_kind(s)] if t.objective != "sft" else []), "",
             "per rank (rank 0, the largest shard):"]
    for k, v in est.terms.items():
        if v:
            lines.append(f"  {k:<44} {format_bytes(v):>12}")
    lines += ["", "peak by phase:"]
    for k, v in est.phases.items():
        mark = "  <- peak" if k == est.peak_phase else ""
        lines.append(f"  {k:<44} {format_bytes(v):>12}{mark}")
    if s.context > 1:
        lines += render_communication(est)
    need = est.peak * FRAGMENTATION + RUNTIME_OVERHEAD
    lines += ["", (f"GPU: peak allocated {format_bytes(est.peak)}; with {int((FRAGMENTATION - 1) * 100)}% "
                   f"fragmentation and {RUNTIME_OVERHEAD / GIB:.0f} GiB CUDA context/NCCL about "
                   f"{format_bytes(need)} of {format_bytes(s.facts.gpu_memory)}")]
    if est.cpu_per_rank:
        ref = ", the reference's weights" if s.reference in ("copy", "initial") else ""
        what = ("the pinned parameter and gradient shards, AdamW state" + ref if s.cfg.parallel.cpu_offload
                else "the stream buffers: a few chunks' moments, gradients and parameter shards"
                if est.nvme_per_rank else "AdamW state and the pinned staging of the gradient and parameter shards")
        cpu = (f"CPU (offload): {format_bytes(est.cpu_per_rank)} per rank, {format_bytes(est.cpu_per_node)} "
               f"per node ({what})")
        if s.facts.cpu_memory is not None:
            cpu += f" of {format_bytes(s.facts.cpu_memory)}"
        lines.append(cpu)
    if est.nvme_per_rank:
        lines.append(f"NVMe (optimizer_offload nvme): {format_bytes(est.nvme_per_rank)} per rank, "
                     f"{format_bytes(est.nvme_per_node)} per node (AdamW state, in parallel.offload_dir)")
    lines.append(f"verdict: {'fits' if est.fits else 'does NOT fit'}")
    if est.advice:
        lines.append("what to change (each alone):" if not est.fits else "more room:")
        lines += [f"  {a}" for a in est.advice]
    return "\n".join(lines) + "\n"


def estimate(cfg: Config, nnodes: int, gpus_per_node: int, gpu_memory: int, cpu_memory: int | None = None,
             shape: ModelShape | None = None) -> Estimate:
    if nnodes < 1 or gpus_per_node < 1:
        raise UserError(f"estimate: --nnodes {nnodes} and --gpus-per-node {gpus_per_node} must be at least 1")
    m = shape or shape_from_config(cfg)
    s = settings_from_config(cfg, nnodes, gpus_per_node, gpu_memory, cpu_memory)
    if s.context > 1:  # what training refuses at start-up, refused here too (the same lines)
        from ..dist import context
        from ..model import ulysses

        context.layout(s.context, s.world, 0)
        ulysses.check_heads(m.heads, s.context, m.model_type)
    if s.cfg.parallel.activation_checkpointing == "auto":
        _, est = plan_checkpointing(m, s, budget_bytes(min(budgets(cfg.parallel)), gpu_memory))
    else:
        est = compute(m, s)
    est.advice = advise(m, est)
    return est


def weighted_micro_batch(cfg: Config, rank: int, world_size: int, local_world_size: int) -> int | None:
    """data.balance with fixed weights: the examples a micro-batch of `rank` holds, about its share of the step's
    world_size x train.micro_batch_size examples (the split is by tokens: rounded up, at least one); None when
    the split is by count (none) or not known before the run (speed)."""
    balance = cfg.data.balance
    if not isinstance(balance, list) or world_size < 2:
        return None
    weights = per_rank("data.balance", balance, world_size, local_world_size, "one weight per rank or one per node")
    return max(1, math.ceil(weights[rank] / sum(weights) * world_size * cfg.train.micro_batch_size - 1e-9))


def speed_balance_note(cfg: Config, world_size: int) -> str | None:
    """activation_checkpointing auto under data.balance: speed plans for train.micro_batch_size, but the shares
    are measured during the run: a fast rank's micro-batches grow with its share. One line saying how far, or
    None when the run does not balance by speed."""
    if cfg.data.balance != "speed" or world_size < 2:
        return None
    mbs = cfg.train.micro_batch_size
    return (f"activation checkpointing auto: planned for train.micro_batch_size {mbs}, but under data.balance: speed "
            f"a fast rank's micro-batches grow with its measured share, up to {world_size * mbs - (world_size - 1)} "
            f"examples; leave the fast GPUs headroom (parallel.memory_budget_gib per rank) or give the ranks fixed "
            f"weights (data.balance: [..], planned for each rank's share)")


def plan_auto_checkpointing(cfg: Config, model: nn.Module, world_size: int, local_world_size: int,
                            device: torch.device, rank: int = 0) -> tuple[list[str], str]:
    """activation_checkpointing auto: on each rank, the least recomputation whose estimated peak fits that rank's
    budget (its parallel.memory_budget_gib entry, or its own GPU's memory: a 24 GB card checkpoints more than an
    80 GB one beside it). FSDP2 issues the same collectives whatever a block recomputes (the pre-backward hook
    gathers, not the recomputation), so ranks may differ. Returns this rank's per-block modes and a log line
    with every rank's plan (one all_gather)."""
    import torch

    from ..dist import distributed
    from ..dist.plan import rank_budget_gib

    gpu_memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    budget = budget_bytes(rank_budget_gib(cfg.parallel, rank, world_size, local_world_size), gpu_memory)
    nnodes = max(1, world_size // max(1, local_world_size))
    settings = settings_from_config(cfg, nnodes, world_size // nnodes, gpu_memory or budget, device_type=device.type)
    if (examples := weighted_micro_batch(cfg, rank, world_size, local_world_size)) is not None:
        settings = settings.vary(train={"micro_batch_size": examples})  # its share, not the nominal size
    modes, est = plan_checkpointing(shape_of_model(model), settings, budget)
    codes = {"none": 0, "selective": 1, "full": 2}
    row = [float(budget), float(est.peak), *(float(codes[x]) for x in modes)]
    rows = [row]
    # a launched group (not the fake one memory.trace plans in, whose tensors hold no values)
    if world_size > 1 and torch.distributed.is_initialized() and torch.distributed.get_backend() != "fake":
        rows = distributed.all_gather_rows(torch.tensor(row, dtype=torch.float64, device=device), world_size).tolist()
    names = {v: k for k, v in codes.items()}

    def line(r: list[float]) -> str:
        plan, peak, cap = [names[int(x)] for x in r[2:]], int(r[1]), int(r[0])
        verdict = "fits" if peak <= cap else "does NOT fit even with every block full; see `fsdptrain estimate`"
        return (f"{describe_modes(plan)}; estimated peak {format_bytes(peak)} for a budget of {format_bytes(cap)} "
                f"({verdict})")

    if all(r == rows[0] for r in rows):
        return modes, f"activation checkpointing auto: {line(rows[0])}"
    return modes, "activation checkpointing auto, planned per rank: " + "; ".join(
        f"rank {k}: {line(r)}" for k, r in enumerate(rows))


def rank_sizes(text: str, nnodes: int, gpus_per_node: int, option: str = "--gpu-memory") -> list[str]:
    """A per-rank list from `option`: one value for every GPU, one per node, or one per rank; `NxV` repeats V N
    times (4x24GiB,4x80GiB). One-line UserError for a length that fits neither."""
    values: list[str] = []
    for part in (x.strip() for x in text.split(",")):
        count, x, value = part.partition("x")
        if x and count.isdigit() and value:
            values += [value] * int(count)
        else:
            values.append(part)
    world = nnodes * gpus_per_node
    if len(values) == 1:
        return values * world
    if len(values) == world:
        return values
    if len(values) == nnodes:
        return [values[r // gpus_per_node] for r in range(world)]
    raise UserError(f"{option}: {len(values)} values for {nnodes} node(s) x {gpus_per_node} GPUs; give one value, "
                    f"one per node ({nnodes}) or one per GPU ({world}), e.g. 4x24GiB,4x80GiB")


def ranks_text(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> 'ranks 0-2, 5'."""
    return ("rank " if len(ranks) == 1 else "ranks ") + rank_ranges(ranks)


def render_mixed(estimates: dict[int, Estimate], ranks: dict[int, list[int]]) -> str:
    """One line per GPU size of a mixed cluster: its ranks, their own plan (activation_checkpointing auto plans
    each rank for its memory), peak and verdict."""
    lines = ["per GPU size (each rank plans for its own memory):"]
    for size, est in sorted(estimates.items()):
        s = est.settings
        plan = describe_modes(s.modes(est.shape.layers)) if s.cfg.parallel.activation_checkpointing == "auto" \
            else f"checkpointing {s.cfg.parallel.activation_checkpointing}"
        lines.append(f"  {ranks_text(ranks[size])} ({format_bytes(size)}): {plan}; peak {format_bytes(est.peak)}; "
                     f"{'fits' if est.fits else 'does NOT fit'}")
    return "\n".join(lines) + "\n"


def render_speeds(speeds: list[float]) -> str:
    """data.balance: speed's expected split for relative GPU speeds, and the step against an unbalanced one
    (there the slowest GPU sets the pace: each rank's equal share over the slowest speed)."""
    total = sum(speeds)
    groups: dict[float, list[int]] = {}
    for r, v in enumerate(speeds):
        groups.setdefault(v, []).append(r)
    shares = "; ".join(f"{ranks_text(rs)} {v / total:.3f} each" for v, rs in sorted(groups.items()))
    ratio = len(speeds) * min(speeds) / total
    return (f"data.balance: speed for these speeds: shares of each step's tokens {shares}; a step's compute about "
            f"{ratio:.2f}x of the unbalanced step (where every rank waits for the slowest)\n")
