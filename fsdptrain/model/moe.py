"""Mixture-of-experts training: the router's auxiliary-loss weight and the expert-load statistics.

Auxiliary loss. transformers' MoE causal LMs (mixtral, qwen2_moe, qwen3_moe,
olmoe, gpt_oss, ...) compute the Switch-Transformer load-balancing loss
themselves when called with `output_router_logits=True` (`outputs.aux_loss`,
their own `load_balancing_loss_func` over every layer's router logits). The
trainer asks for it and adds `coef x aux_loss` per micro-batch (loss.py,
trainer.py); this module only decides the coefficient: `train.router_aux_loss_coef`,
null meaning the model config's `router_aux_loss_coef`. A model whose forward
has no `output_router_logits` (deepseek_v2/v3, glm4_moe: a bias-corrected,
auxiliary-loss-free router) trains without one; asking for one there is refused.
So does a config whose layers have no learned router although the forward takes
`output_router_logits` (`routerless`): a dense Doge (`is_moe: false`) returns
no auxiliary loss, and a DeepSeek-V4 whose MoE layers are all hash-routed
fails inside transformers' `load_balancing_loss_func` when asked for one.

Under context parallelism (each rank of a group holds a chunk of every row)
the routing of each token is the same as without it, but the balancing loss
multiplies two means over the forward's tokens, so a chunk's loss is not the
rows'. `balance_over_context` makes it the rows' again: the family's
`load_balancing_loss_func` (module-level in every transformers MoE family, its
first argument each layer's router logits, one row per token) is wrapped so that
during a context-parallel micro-batch it gets the group's router logits
concatenated (model/ulysses.py gather_rows, differentiable): every rank of the
group computes the rows' loss, and backward hands each rank its tokens'
gradients summed over the group's copies (which FSDP's average over all ranks
turns into the unsplit run's gradient, as for the preference objectives:
objectives/base.py).

Expert load. A forward pre-hook on every experts module (the module that takes
the router's top-k expert indices as its second argument) adds the tokens each
expert receives to a [layers, experts] counter on the device (scatter_add: no
host sync per layer). The counter only counts while `counting` is on, so a
checkpointed block recomputed in backward is not counted twice. On log steps
the counts are summed over ranks with one all_reduce, summarised and reset: a
log step reports the tokens routed since the previous log step.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..core.errors import ConfigError
from . import ulysses

ROUTED_ARGS = ("top_k_index", "router_indices")  # an experts module's forward(hidden_states, <this>, weights)
IMBALANCE_WARN = 2.0  # warn when the busiest expert of a layer gets this many times the layer's mean ...
WARN_MIN_MEAN = 64.0  # ... and the mean is at least this many tokens (below, the ratio is mostly noise)


def expert_modules(model: nn.Module) -> list[tuple[str, nn.Module, str, int]]:
    """(name, module, name of its routed-index argument, number of experts) of every experts module, in order."""
    found = []
    for name, module in model.named_modules():
        params = list(inspect.signature(type(module).forward).parameters)
        if len(params) >= 3 and params[2] in ROUTED_ARGS:
            found.append((name, module, params[2], count_experts(module)))
    return found


def count_experts(module: nn.Module) -> int:
    n = getattr(module, "num_experts", None)
    if isinstance(n, int):
        return n
    stacked = [p for p in module.parameters(recurse=False) if p.ndim == 3]  # [experts, out, in]
    if not stacked:
        raise ValueError(f"{type(module).__name__}: cannot tell its number of experts")
    return int(stacked[0].shape[0])


def routerless(config: Any) -> Optional[str]:
    """Why this config has no learned router although its model class has a router auxiliary loss; None when it
    has one. transformers' forward then returns no aux_loss (Doge) or cannot compute it (DeepSeek-V4)."""
    if config.model_type == "doge" and not getattr(config, "is_moe", False):
        return "is_moe is false: the MLPs are dense"
    if config.model_type == "deepseek_v4" and "moe" not in (getattr(config, "mlp_layer_types", None) or []):
        return "every MoE layer is hash-routed (no 'moe' in mlp_layer_types)"
    return None


def has_aux_loss(model: nn.Module) -> bool:
    """Whether transformers computes a router auxiliary loss for this model (its forward takes
    output_router_logits and returns outputs.aux_loss, and its config has a learned router)."""
    return ("output_router_logits" in inspect.signature(type(model).forward).parameters
            and routerless(model.config) is None)


def resolve_aux_coef(configured: Optional[float], model: nn.Module) -> float:
    """The coefficient the objective uses: configured, or the model config's router_aux_loss_coef (0 without)."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if not has_aux_loss(model):
        if configured:
            why = routerless(model.config) or "its router balances experts without one"
            raise ConfigError(f"train.router_aux_loss_coef: model_type '{model_type}' has no router auxiliary loss "
                              f"in transformers ({why}); set it to null or 0")
        return 0.0
    if configured is not None:
        return float(configured)
    return float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)


BALANCING = "load_balancing_loss_func"  # the module-level function transformers' MoE families compute it with


def balance_over_context(model: nn.Module) -> None:
    """Context parallelism with a router auxiliary loss: wrap the model family's balancing-loss function so that
    it sees the whole rows' router logits (see the module docstring); idempotent. Refuses a family whose function
    does not take the router logits first."""
    for cls in type(model).__mro__:
        module = sys.modules.get(cls.__module__)
        func = getattr(module, BALANCING, None)
        if func is None:
            continue
        if getattr(func, "_fsdptrain_context", False):
            return
        if next(iter(inspect.signature(func).parameters), None) != "gate_logits":
            break
        setattr(module, BALANCING, whole_rows_balancing(func))
        return
    model_type = getattr(model.config, "model_type", type(model).__name__)
    raise ConfigError(f"parallel.context_parallel: model_type '{model_type}' computes its router auxiliary loss in "
                      "a way fsdptrain cannot combine over the context group; set train.router_aux_loss_coef=0 or "
                      "parallel.context_parallel=1")


def whole_rows_balancing(func: Callable) -> Callable:
    """`func` (a transformers balancing-loss function) on the context group's router logits while a
    context-parallel micro-batch is in flight; `func` itself otherwise."""
    @functools.wraps(func)
    def wrapped(gate_logits: Any, *args: Any, **kwargs: Any) -> Any:
        if ulysses.splitting() and isinstance(gate_logits, tuple):
            if any(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values())):  # an attention mask
                raise ValueError("context parallelism: a balancing loss with an attention mask is not supported")
            gate_logits = tuple(ulysses.gather_rows(g) for g in gate_logits)
        return func(gate_logits, *args, **kwargs)

    wrapped._fsdptrain_context = True  # type: ignore[attr-defined]
    return wrapped


@dataclass
class ExpertLoad:
    """Tokens per expert of every MoE layer, counted on the device by forward pre-hooks."""
    names: list[str]  # the experts modules, one per MoE layer
    n_experts: int
    counts: torch.Tensor  # int64 [layers, experts + 1]; the last column takes out-of-range indices (none routed)
    active: bool = False
    handles: list[Any] = field(default_factory=list)

    def hook(self, layer: int, arg: str):
        def count(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not self.active:
                return
            idx = (args[1] if len(args) > 1 else kwargs[arg]).reshape(-1)
            idx = torch.where((idx >= 0) & (idx < self.n_experts), idx, self.n_experts)
            self.counts[layer].scatter_add_(0, idx, torch.ones_like(idx))
        return count

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def track_expert_load(model: nn.Module, device: torch.device) -> Optional[ExpertLoad]:
    """Hooks on the model's experts modules; None for a dense model."""
    found = expert_modules(model)
    if not found:
        return None
    n = max(e for *_, e in found)
    load = ExpertLoad([name for name, *_ in found], n, torch.zeros(len(found), n + 1, dtype=torch.int64,
                                                                   device=device))
    for layer, (_, module, arg, _) in enumerate(found):
        load.handles.append(module.register_forward_pre_hook(load.hook(layer, arg), with_kwargs=True))
    return load


@contextmanager
def counting(load: Optional[ExpertLoad]) -> Iterator[None]:
    """Count routed tokens during this block (a training forward), not during recomputation in backward."""
    if load is None:
        yield
        return
    load.active = True
    try:
        yield
    finally:
        load.active = False


def take_counts(load: ExpertLoad) -> torch.Tensor:
    """The counts since the last call summed over all ranks, [layers, experts] (collective on every rank)."""
    from ..dist import distributed

    total = distributed.all_reduce_sum(load.counts.clone())
    load.counts.zero_()
    return total[:, :load.n_experts]


def summarize(counts: torch.Tensor) -> dict[str, float]:
    """Metrics of a [layers, experts] count: min / max / mean tokens per expert over every layer's experts, and
    the worst layer's max / mean ratio (1.0 = perfectly even; at most experts / top_k)."""
    c = counts.double()
    per_layer_mean = c.mean(dim=1)
    ratio = torch.where(per_layer_mean > 0, c.max(dim=1).values / per_layer_mean.clamp(min=1e-12),
                        torch.ones_like(per_layer_mean))
    return {"moe_tokens_per_expert_min": int(c.min().item()), "moe_tokens_per_expert_max": int(c.max().item()),
            "moe_tokens_per_expert_mean": float(c.mean().item()), "moe_imbalance": float(ratio.max().item()),
            "moe_imbalance_layer": int(ratio.argmax().item())}


def imbalance_warning(step: int, metrics: dict[str, float]) -> Optional[str]:
    ratio, mean = metrics["moe_imbalance"], metrics["moe_tokens_per_expert_mean"]
    if ratio < IMBALANCE_WARN or mean < WARN_MIN_MEAN:
        return None
    return (f"step {step}: MoE routing is unbalanced: in layer {metrics['moe_imbalance_layer']} the busiest expert "
            f"got {ratio:.1f}x the mean of {mean:.0f} tokens per expert (min {metrics['moe_tokens_per_expert_min']},"
            f" max {metrics['moe_tokens_per_expert_max']} over all layers); check train.router_aux_loss_coef")
