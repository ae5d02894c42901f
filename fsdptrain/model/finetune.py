"""Parameter-efficient fine-tuning: LoRA adapters and freezing, applied to the meta model before sharding.

`prepare` runs on the meta-device model, before `fully_shard`: it turns each
targeted `nn.Linear` into a `LoRALinear` (same class otherwise, same weight and
bias, plus two child layers `lora_A` [r, in] and `lora_B` [out, r]), so the
adapters are parameters of their block and `fully_shard(block)` shards them in
the block's FSDP unit. It then marks what trains (`requires_grad`), so FSDP only
reduces, and the optimizer only holds state for, the trainable parameters.
State-dict keys of the base stay Hugging Face's (`...q_proj.weight`); the
adapters add `...q_proj.lora_A.weight` and `...q_proj.lora_B.weight`.

With bf16-mixed the frozen base is stored in bf16 (it is never updated, so an fp32
master copy would be wasted), while the trainable parameters keep fp32 masters.
FSDP2 needs one original dtype only among the trainable parameters of a unit and
all-gathers every parameter in the policy's bf16, so frozen bf16 base weights and
fp32 adapters share a unit.

`init_adapters` fills the adapters after the base is materialised: lora_A like
PEFT's default (Kaiming-uniform, a = sqrt(5)), seeded per module name so the
values do not depend on the world size, and lora_B zero (the model starts as the base).

Preference training needs the model it started from as its reference, without a second copy:
`adapters_disabled` makes a LoRA model compute its frozen base (every adapter skipped), and `InitialWeights`
keeps a copy of only the trainable shards of a freeze run as they were loaded and swaps them in for a forward.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config.schema import FinetuneConfig
from ..core.errors import ConfigError
from .models import local_tensor

ALL = ("all", "all-linear")
ADAPTERS = ("lora_A", "lora_B")


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update: y = x W^T + b + scaling * B(A(dropout(x)))."""

    lora_scaling: float = 1.0
    lora_off: bool = False  # adapters_disabled: the base layer alone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.lora_off:
            return out
        return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.lora_scaling


@dataclass
class FinetunePlan:
    """What `prepare` did, for the loader, the checkpoint and the export."""
    method: str  # full | lora | freeze
    lora_modules: list[str] = field(default_factory=list)  # full module names that got adapters
    targets: list[str] = field(default_factory=list)  # lora: resolved target names (last name parts)
    rank: int = 0
    alpha: float = 0.0
    scaling: float = 1.0
    use_rslora: bool = False
    dropout: float = 0.0
    modules_to_save: list[str] = field(default_factory=list)
    trainable: list[str] = field(default_factory=list)  # parameter names that train
    n_trainable: int = 0
    n_total: int = 0

    @property
    def new_params(self) -> set[str]:
        """Parameters that are not in the base model's files (the adapters)."""
        return {f"{m}.{a}.weight" for m in self.lora_modules for a in ADAPTERS}

    def identity(self, base: Optional[str]) -> dict[str, Any]:
        """What a checkpoint records and a resume must match (train_state.json's `finetune`)."""
        ident: dict[str, Any] = {"method": self.method, "base": base}
        if self.method == "lora":
            ident.update(rank=self.rank, alpha=self.alpha, use_rslora=self.use_rslora, targets=self.targets,
                         modules=len(self.lora_modules), modules_to_save=self.modules_to_save)
        else:
            ident["trainable"] = self.trainable
        return ident

    def describe(self) -> str:
        share = f"trainable {self.n_trainable / 1e6:.3f}M of {self.n_total / 1e6:.2f}M params " \
                f"({100 * self.n_trainable / max(1, self.n_total):.2f}%)"
        if self.method == "lora":
            extra = f", modules_to_save {', '.join(self.modules_to_save)}" if self.modules_to_save else ""
            return (f"finetune: lora rank {self.rank}, alpha {self.alpha:g}{' (rsLoRA)' if self.use_rslora else ''}"
                    f" on {len(self.lora_modules)} layers ({', '.join(self.targets)}){extra}; {share}")
        return f"finetune: freeze, {share}"


def names_to_list(value: Any) -> list[str]:
    """'q_proj, v_proj' or ['q_proj', 'v_proj'] -> ['q_proj', 'v_proj']."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(x).strip() for x in items if str(x).strip()]


def matches(name: str, pattern: str) -> bool:
    """A module name matches a pattern equal to it or to its last dotted part(s) (PEFT's rule)."""
    return name == pattern or name.endswith("." + pattern)


def block_linears(model: nn.Module, blocks: list[nn.Module]) -> dict[str, nn.Linear]:
    """Full name -> nn.Linear for every linear layer inside the transformer blocks."""
    inside = {id(m) for b in blocks for m in b.modules()}
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) in inside}


def resolve_targets(model: nn.Module, blocks: list[nn.Module], target: Any) -> tuple[list[str], list[str]]:
    """(module names that get adapters, target names) for finetune.lora.target; one line when one matches nothing."""
    linears = block_linears(model, blocks)
    kinds = sorted({n.rsplit(".", 1)[-1] for n in linears})
    wanted = names_to_list(target)
    if any(w.lower() in ALL for w in wanted):
        return list(linears), kinds
    chosen: list[str] = []
    for w in wanted:
        hit = [n for n in linears if matches(n, w)]
        if not hit:
            raise ConfigError(f"finetune.lora.target: {w!r} matches no linear layer of the model's blocks; its linear "
                              f"layers are: {', '.join(kinds)} (or all)")
        chosen += [n for n in hit if n not in chosen]
    return [n for n in linears if n in chosen], wanted


def add_adapter(layer: nn.Linear, rank: int, scaling: float, dropout: float, dtype: torch.dtype) -> None:
    """Turn `layer` (on the meta device) into a LoRALinear; its weight and bias are untouched."""
    device = layer.weight.device
    layer.add_module("lora_A", nn.Linear(layer.in_features, rank, bias=False, device=device, dtype=dtype))
    layer.add_module("lora_B", nn.Linear(rank, layer.out_features, bias=False, device=device, dtype=dtype))
    layer.add_module("lora_dropout", nn.Dropout(dropout) if dropout > 0 else nn.Identity())
    layer.__class__ = LoRALinear
    layer.lora_scaling = scaling


def module_params(model: nn.Module, patterns: list[str], key: str) -> set[str]:
    """Parameter names under the modules matching `patterns`; one line naming a pattern that matches nothing."""
    names: set[str] = set()
    modules = dict(model.named_modules())
    for pat in patterns:
        hit = [n for n in modules if n and matches(n, pat)]
        if not hit:
            tops = sorted({n.rsplit(".", 1)[-1] for n in modules if n and not any(c.isdigit() for c in n)})
            raise ConfigError(f"{key}: {pat!r} matches no module of the model; its modules include: "
                              f"{', '.join(tops)}")
        for n in hit:
            names |= {f"{n}.{p}" for p, _ in modules[n].named_parameters()}
    return names


def freeze_trainable(model: nn.Module, blocks: list[nn.Module], fcfg) -> set[str]:
    """Parameter names that train under finetune.freeze."""
    k = fcfg.trainable_layers
    if abs(k) > len(blocks):
        raise ConfigError(f"finetune.freeze.trainable_layers: {k} but the model has {len(blocks)} blocks; give "
                          f"a value from -{len(blocks)} to {len(blocks)}")
    chosen = blocks[len(blocks) - k:] if k > 0 else blocks[:-k] if k < 0 else []
    block_name = {id(m): n for n, m in model.named_modules()}
    patterns = names_to_list(fcfg.trainable_modules)
    names: set[str] = set()
    for b in chosen:
        prefix = block_name[id(b)]
        if any(p.lower() == "all" for p in patterns):
            names |= {f"{prefix}.{p}" for p, _ in b.named_parameters()}
            continue
        for pat in patterns:
            hit = {f"{prefix}.{n}.{p}" for n, m in b.named_modules() if n and matches(n, pat)
                   for p, _ in m.named_parameters()}
            if not hit:
                kinds = sorted({n.rsplit(".", 1)[-1] for n, _ in b.named_modules() if n})
                raise ConfigError(f"finetune.freeze.trainable_modules: {pat!r} matches nothing in block {prefix}; "
                                  f"its modules are: {', '.join(kinds)} (or all)")
            names |= hit
    return names | module_params(model, names_to_list(fcfg.extra_modules), "finetune.freeze.extra_modules")


def store_frozen_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Replace every frozen floating parameter (on the meta device) by one of `dtype`; tied ones stay tied."""
    done: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        for attr, p in list(mod._parameters.items()):
            if p is None or p.requires_grad or not p.is_floating_point() or p.dtype == dtype:
                continue
            if id(p) not in done:
                done[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
            mod._parameters[attr] = done[id(p)]


def prepare(model: nn.Module, blocks: list[nn.Module], fcfg: FinetuneConfig, precision: str,
            always: tuple[str, ...] = ()) -> FinetunePlan:
    """Add adapters / mark what trains on the meta model (before fully_shard); see the module docstring.
    `always`: modules that train in full whatever the method (a reward model's score head): LoRA saves them as
    modules_to_save."""
    n_total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    if fcfg.method == "full":
        return FinetunePlan("full", n_trainable=n_total, n_total=n_total)
    # adapters and trained extras keep fp32 masters unless every weight is bf16 (bf16-pure)
    train_dtype = torch.bfloat16 if precision == "bf16-pure" else torch.float32
    plan = FinetunePlan(fcfg.method, n_total=n_total)
    if fcfg.method == "lora":
        lc = fcfg.lora
        plan.lora_modules, plan.targets = resolve_targets(model, blocks, lc.target)
        plan.rank, plan.alpha, plan.use_rslora, plan.dropout = lc.rank, float(lc.alpha or 2 * lc.rank), \
            lc.use_rslora, lc.dropout
        plan.scaling = plan.alpha / (math.sqrt(lc.rank) if lc.use_rslora else lc.rank)
        modules = dict(model.named_modules())
        for name in plan.lora_modules:
            add_adapter(modules[name], lc.rank, plan.scaling, lc.dropout, train_dtype)
        plan.modules_to_save = names_to_list(lc.modules_to_save)
        plan.modules_to_save += [m for m in always if m not in plan.modules_to_save]
        trainable = plan.new_params | module_params(model, plan.modules_to_save, "finetune.lora.modules_to_save")
    else:
        trainable = freeze_trainable(model, blocks, fcfg.freeze)
        trainable |= module_params(model, list(always), "the reward head") if always else set()
    for name, p in model.named_parameters(remove_duplicate=False):
        p.requires_grad_(name in trainable)
    for name, p in model.named_parameters(remove_duplicate=False):  # a tied weight trains if any of its names does
        if name in trainable:
            p.requires_grad_(True)
    for mod in model.modules():  # trained base weights (freeze, modules_to_save) get masters of the adapters' dtype
        for attr, p in list(mod._parameters.items()):
            if p is not None and p.requires_grad and p.dtype != train_dtype and p.is_floating_point():
                mod._parameters[attr] = nn.Parameter(p.detach().to(train_dtype))
    store_frozen_in(model, torch.bfloat16 if precision.startswith("bf16") else torch.float32)
    unique = {id(p): (n, p) for n, p in model.named_parameters()}.values()
    plan.trainable = sorted(n for n, p in unique if p.requires_grad)
    plan.n_trainable = sum(p.numel() for _, p in unique if p.requires_grad)
    return plan


def _seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(("lora:" + name).encode())) % (2**31)


def adapter_init(seed: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """lora_A's initial value for the module `name`: PEFT's default (Kaiming-uniform, a = sqrt(5)), seeded by
    (seed, module name), the same on any number of ranks."""
    g = torch.Generator().manual_seed(_seed(seed, name))
    full = torch.empty(shape, dtype=torch.float32)
    nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=g)
    return full


@torch.no_grad()
def init_adapters(model: nn.Module, plan: FinetunePlan, seed: int) -> None:
    """Fill every adapter's local shard (after materialising): lora_A from adapter_init, lora_B zero."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    modules = dict(model.named_modules())
    for name in plan.lora_modules:
        layer = modules[name]
        a, b = layer.lora_A.weight, layer.lora_B.weight
        full = adapter_init(seed, name, tuple(a.shape))
        if isinstance(a, DTensor):  # each rank keeps its rows; no communication (every rank computed the same)
            local = distribute_tensor(full, a.device_mesh, a.placements, src_data_rank=None).to_local()
            a.to_local().copy_(local.to(a.dtype))
            b.to_local().zero_()
        else:
            a.copy_(full.to(a.dtype))
            b.zero_()


def peft_key(name: str) -> str:
    """Our adapter parameter name -> its key in a PEFT adapter_model.safetensors."""
    return "base_model.model." + name


def target_modules_for_peft(all_linear_names: list[str], lora_modules: list[str], targets: list[str]) -> Any:
    """PEFT's target_modules selecting exactly `lora_modules`: the short names when they do, else a regular
    expression of the full names (PEFT matches a string as a whole-name regex)."""
    kinds = sorted({n.rsplit(".", 1)[-1] for n in lora_modules})
    if sorted(n for n in all_linear_names if any(matches(n, k) for k in kinds)) == sorted(lora_modules):
        return kinds
    return "^(" + "|".join(re.escape(n) for n in lora_modules) + ")$"


# ----------------------------------------------------------------------------- the model a run started from


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within: `model` computes its frozen base, every LoRA adapter skipped (lora_B(lora_A(x)) is not added, so
    the result is the base layer's exactly). Yields the model."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.lora_off = True
    try:
        yield model
    finally:
        for m in layers:
            m.lora_off = False


class InitialWeights:
    """The trainable parameters' local shards as they were when this was made (a freeze run's loaded weights),
    and a context in which the model computes with them: they are copied in for its duration and the current
    values copied back after (no update may happen inside). Costs a copy of the trainable shards only; the
    frozen weights are shared."""

    def __init__(self, model: nn.Module):
        unique = {id(p): p for p in model.parameters() if p.requires_grad}.values()
        with torch.no_grad():
            self.saved = [(local_tensor(p), local_tensor(p).detach().clone()) for p in unique]

    @contextmanager
    def __call__(self, model: nn.Module) -> Iterator[nn.Module]:
        with torch.no_grad():
            current = [local.clone() for local, _ in self.saved]
            for local, initial in self.saved:
                local.copy_(initial)
        try:
            yield model
        finally:
            with torch.no_grad():
                for (local, _), value in zip(self.saved, current):
                    local.copy_(value)
