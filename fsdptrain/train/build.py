"""The sharded model from a config: meta -> plan -> `fully_shard` -> materialise or load.

This is the one place that assembles a model for training; the trainer, the
tests and the benchmarks all call `build_sharded_model`, so what they measure
and check is what training runs. No rank ever holds a full copy: the model is
built on the meta device, sharded there, and only then are the local shards
allocated and filled (random init, or each rank's rows read from safetensors).

`build_reference` gives a preference run's reference model by the cheapest correct means: a LoRA run's policy
with its adapters off, a freeze run's policy with its trainable shards as loaded swapped in, and for full
fine-tuning a second sharded copy, frozen (no gradients, no optimizer state; bf16 under bf16-mixed). A reference
folder of its own (preference.ref_model, checked by `reference_config`) is always such a frozen copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..config.schema import Config
from ..core import log
from ..core.errors import UserError
from ..dist.distributed import DistInfo
from ..dist.mesh import build_mesh, describe
from ..dist.plan import matmul_tf32, resolve_precision
from ..memory.estimate import plan_auto_checkpointing, speed_balance_note
from ..model import families, finetune, models, ulysses
from .parallelize import ParallelPlan, after_no_grad_forward, apply_fsdp

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass
class ShardedModel:
    model: nn.Module
    blocks: list[nn.Module]  # the FSDP units below the root, in order
    mesh: DeviceMesh
    plan: ParallelPlan
    n_params: int
    weights: Optional[str]  # the folder the weights came from; None: random init
    finetune: Optional[finetune.FinetunePlan] = None  # what trains (method full: everything)

    def describe(self, hf_config: PretrainedConfig) -> str:
        """The start-up line about the model."""
        p = self.plan
        source = "from " + self.weights if self.weights else "random init"
        return (f"model: {hf_config.model_type}, {self.n_params / 1e6:.2f}M params, {len(self.blocks)} blocks, "
                f"precision {p.precision}, checkpointed blocks {len(p.checkpointed)}, offload {p.offload}, "
                f"mesh {describe(self.mesh)}, weights {source}")


def use_matmul_precision(precision: str, device_type: str) -> None:
    """TF32 tensor cores for fp32 matmuls on CUDA (plan.matmul_tf32). Through torch.backends.cuda only: the
    global set_float32_matmul_precision would also switch oneDNN's CPU matmuls."""
    if matmul_tf32(precision, device_type):
        torch.backends.cuda.matmul.allow_tf32 = True


def build_sharded_model(cfg: Config, info: DistInfo, hf_config: PretrainedConfig,
                        weights: Optional[str] = None, mesh: Optional[DeviceMesh] = None,
                        fill: bool = True, frozen: bool = False) -> ShardedModel:
    """Build, shard and fill the model of `cfg` on this rank.

    weights: a Hugging Face folder to load; default: cfg.model.path unless model.random_init (or no path).
    mesh: the device mesh, when the caller built it (memory.trace builds it outside its fake-tensor mode);
    default: mesh.build_mesh for cfg.parallel.
    fill: False allocates the shards and restores the buffers but neither loads nor initialises the weights
    (memory.trace: fake tensors, whose values are never read).
    frozen: nothing trains (a reference model): no gradients, weights stored in the compute dtype, no activation
    checkpointing (it never runs backward), in eval mode.
    """
    if weights is None and cfg.model.path is not None and not cfg.model.random_init:
        weights = cfg.model.path
    precision = resolve_precision(cfg.parallel.precision, info.device_type)
    use_matmul_precision(precision, info.device_type)
    attn, context = cfg.model.attn_implementation, cfg.parallel.context_parallel
    if context > 1:  # every layer's attention: the Ulysses exchange over the context group (model/ulysses.py)
        ulysses.register()
        attn = ulysses.NAME
    model = models.build_meta_model(hf_config, attn, models.DTYPES[precision], cfg.model.trust_remote_code)
    if context > 1:
        ulysses.check_model(model, hf_config, context)
    n_params = models.count_params(model)
    blocks = models.find_blocks(model)
    families.check_trainable(model, blocks, hf_config.model_type)  # before any weight is read
    if frozen:
        for p in model.parameters():
            p.requires_grad_(False)
        finetune.store_frozen_in(model, models.DTYPES["bf16-pure" if precision.startswith("bf16") else "fp32"])
        cfg = replace(cfg, parallel=replace(cfg.parallel, activation_checkpointing="none"))
        ft = finetune.FinetunePlan("frozen", n_total=n_params)
    else:
        # a reward model's score head always trains (LoRA: as a module to save; freeze: beside the trained layers)
        head = (models.REWARD_HEAD,) if models.is_reward_config(hf_config) else ()
        ft = finetune.prepare(model, blocks, cfg.finetune, precision, head)  # adapters join their block's unit
    if ft.method not in ("full", "frozen"):
        log.info(ft.describe())
    mesh = mesh if mesh is not None else build_mesh(info, cfg.parallel)
    modes = None
    if cfg.parallel.activation_checkpointing == "auto":  # planned from the memory estimate, before sharding
        modes, note = plan_auto_checkpointing(cfg, model, info.world_size, info.local_world_size, info.device,
                                             info.rank)
        log.info(note)
        if (warning := speed_balance_note(cfg, info.world_size)) is not None:
            log.info(warning)
    plan = apply_fsdp(model, blocks, mesh, cfg.parallel, precision, modes)
    # Offloaded shards live in host memory, but random init runs on the GPU (CPU init of a large model is slow).
    device = torch.device("cpu") if plan.offload else info.device
    if not fill:
        model.to_empty(device=device)
        models.restore_buffers(model)
    else:
        fresh = models.fresh_reward_head(model, hf_config, weights)
        models.materialize(model, device, cfg.seed, weights, init_device=info.device,
                           skip=frozenset(ft.new_params) | fresh)
        models.zero_params(model, fresh)
        if ft.lora_modules:
            finetune.init_adapters(model, ft, cfg.seed)
        if frozen:
            model.eval()
    if plan.offload:  # FSDP2 keeps the offloaded shards on the CPU and moves no buffers: they go where compute runs
        models.move_buffers(model, info.device)
    return ShardedModel(model, blocks, mesh, plan, n_params, weights, ft)


Reference = Callable[[nn.Module], AbstractContextManager]  # policy -> a context yielding the reference model


def reference_config(cfg: Config, policy: PretrainedConfig) -> Optional[PretrainedConfig]:
    """preference.ref_model's transformers config, or None when the run has none: refused in one line unless it
    is a causal LM of the policy's family and vocabulary (the two log-probabilities of a response must score the
    same token ids)."""
    path = cfg.preference.ref_model
    if path is None:
        return None
    if not (Path(path) / "config.json").is_file():
        raise UserError(f"preference.ref_model: {path}: no config.json there; point it at a local Hugging Face "
                        "model folder (the reference model)")
    ref = models.load_hf_config(path, None, None, cfg.model.trust_remote_code)
    fix = "give a reference model of the policy's family and vocabulary (model.path), or remove preference.ref_model"
    if ref.model_type != policy.model_type:
        raise UserError(f"preference.ref_model: {path} is a {ref.model_type} model but the policy is "
                        f"{policy.model_type}; {fix}")
    if ref.vocab_size != policy.vocab_size:
        raise UserError(f"preference.ref_model: {path} has vocab_size {ref.vocab_size} but the policy's is "
                        f"{policy.vocab_size}; {fix}")
    if models.is_reward_config(ref):
        raise UserError(f"preference.ref_model: {path} holds a reward model ({ref.architectures[0]}, no "
                        f"language-model head); {fix}")
    return ref


def build_reference(cfg: Config, info: DistInfo, hf_config: PretrainedConfig, sharded: ShardedModel,
                    ref_config: Optional[PretrainedConfig] = None, fill: bool = True) -> Reference:
    """The reference model of a preference run: given the policy, a context in which the yielded model computes
    what the run started from (call it under no_grad, before the policy's own forward of the micro-batch).
    ref_config: preference.ref_model's config (`reference_config`): a frozen copy of that folder instead, whatever
    the fine-tuning method (the policy with its adapters off would be the starting model, not that folder).
    fill: as for build_sharded_model (memory.trace builds the reference copy on fake tensors, unfilled)."""
    method = sharded.finetune.method if sharded.finetune is not None else "full"
    if ref_config is None and method == "lora":
        return _tidied(finetune.adapters_disabled)
    if ref_config is None and method == "freeze":
        return _tidied(finetune.InitialWeights(sharded.model))
    if ref_config is None:
        ref = build_sharded_model(cfg, info, hf_config, mesh=sharded.mesh, fill=fill, frozen=True).model
        log.info("reference model: a frozen sharded copy of the starting weights (full fine-tuning)")
    else:
        ref = build_sharded_model(cfg, info, ref_config, weights=cfg.preference.ref_model, mesh=sharded.mesh,
                                  fill=fill, frozen=True).model
        extra = f" (under {method} a separate copy: the reference is not the policy's base)" if method != "full" else ""
        log.info(f"reference model: a frozen sharded copy of {cfg.preference.ref_model}{extra}")

    @contextmanager
    def separate(policy: nn.Module) -> Iterator[nn.Module]:
        yield ref

    return _tidied(separate)


def _tidied(reference: Reference) -> Reference:
    """`reference` with FSDP2's records of its forward tidied after it (parallelize.after_no_grad_forward), and the
    policy's tidied before it: a no-grad forward of the policy (evaluation) leaves the units that keep their
    weights after forward (the root, the last block) gathered, since no backward follows to free them, so the
    freeze reference's initial shards, copied in below those gathered weights, would not be seen: its forward would
    reuse the policy's trained weights there. After a training step's backward this finds nothing to do."""
    @contextmanager
    def run(policy: nn.Module) -> Iterator[nn.Module]:
        after_no_grad_forward(policy)
        with reference(policy) as model:
            try:
                yield model
            finally:
                after_no_grad_forward(model)
    return run
