"""Build and load Hugging Face causal LMs without materialising them whole on any rank.

The recipe (see `trainer.py`):
  1. `build_meta_model`: the architecture on the meta device (no memory).
  2. `parallelize.apply_fsdp`: shard it (DTensor params, still on meta).
  3. `materialize`: allocate only the local shards, then fill them either from
     the model folder's safetensors (each rank reads just its own rows with
     `get_slice`) or with Hugging Face's own init, computed per module from a
     seed so that every world size produces the same weights.
Buffers (RoPE `inv_freq`, Gemma's `embed_scale`, routers' correction biases)
are computed for real by the model's own constructor at build time (only the
parameters go to the meta device, see `build_meta_model`), kept, and copied
back after `to_empty`, which leaves garbage in them; persistent buffers are then
read from the model folder when it has them.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from ..core import log
from ..core.errors import UserError
from ..core.files import FileError, read_json, reading
from .hfconfig import read_config_json, unknown_model_type
from .safetensors_io import SafetensorsFile
from .weightmap import Piece, plan_sources

if TYPE_CHECKING:
    from transformers import PretrainedConfig

DTYPES = {"fp32": torch.float32, "bf16-mixed": torch.float32, "bf16-pure": torch.bfloat16}


# ----------------------------------------------------------------------------- config + skeleton


def load_hf_config(path: Optional[str], inline: Optional[dict], vocab_size: Optional[int], trust_remote_code: bool):
    """The transformers config from model.path or model.hf_config."""
    from transformers import AutoConfig

    if path is not None:
        folder = Path(path)
        config_file = folder / "config.json"
        read_config_json(folder)  # missing, damaged, quantized, an unknown model_type: one line naming the file
        with reading(config_file, "a Hugging Face model config",
                     fix="check that model.path is a Hugging Face model folder whose config.json names a "
                         "model_type this transformers knows"):
            try:
                return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
            except ValueError as e:
                if "trust_remote_code" not in str(e):
                    raise
                raise UserError(f"model.path: {config_file}: {str(e).splitlines()[0]} "
                                "(set model.trust_remote_code=true only if you trust this folder's code)") from None
    fields = dict(inline or {})
    model_type = fields.pop("model_type", None)
    if isinstance(model_type, str) and (unknown := unknown_model_type(model_type)):
        raise UserError(f"model.hf_config: {unknown}; fix model.hf_config.model_type")
    if vocab_size is not None:
        fields.setdefault("vocab_size", vocab_size)
    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as e:  # unknown model_type, a field of the wrong type (transformers validates strictly), ...
        detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise UserError(f"model.hf_config: {detail}") from None


# Constructor tensors above this many elements are created on the meta device (parameters: a 70B model's
# layers, a DeepSeek-V3 expert tensor of 30 GB); smaller ones are computed on the CPU. Buffers are small.
BUILD_ON_CPU_LIMIT = 2**24
_BUFFERS = "_fsdptrain_constructor_buffers"  # attribute of the built model: buffer name -> constructor value


class _ParamsOnMeta(TorchFunctionMode):
    """Build a model with its parameters on the meta device but its buffers computed on the CPU.

    Why: constructors compute buffers (RoPE `inv_freq`, Gemma's `embed_scale = sqrt(hidden)`, DeepSeek-V3's
    `e_score_correction_bias`); under `torch.device("meta")` those values are lost, and `to_empty` later leaves
    garbage in them (Gemma trained with an embedding scale of 3e-8). Re-deriving them from `_init_weights` only
    covers some modules, so instead the constructor's own values are recorded, whatever module they belong to.
    How: tensor factories (torch.empty, torch.tensor, torch.arange, ...) without an explicit device run on the
    CPU when their result is small and on meta when it is large (probed on meta first, so a 30 GB expert tensor
    is never allocated; accelerate's `init_empty_weights(include_buffers=False)` would allocate it), and every
    parameter is moved to meta as it is registered. So parameters end on meta whatever their size, small
    intermediate tensors and buffers are real; a buffer above the limit stays on meta (see `restore_buffers`).
    """

    def __enter__(self):
        self._register = nn.Module.register_parameter
        register = self._register

        def register_on_meta(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
            register(module, name, param)
            p = module._parameters.get(name)
            if p is not None and not p.is_meta:
                extra = dict(p.__dict__)
                extra["requires_grad"] = p.requires_grad
                module._parameters[name] = type(p)(p.to("meta"), **extra)

        nn.Module.register_parameter = register_on_meta
        return super().__enter__()

    def __exit__(self, *exc):
        nn.Module.register_parameter = self._register
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None:
            probe = func(*args, **{**kwargs, "device": "meta"})
            if not isinstance(probe, torch.Tensor) or probe.numel() > BUILD_ON_CPU_LIMIT:
                return probe
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


# A reward model (train.objective rm) is the family's *ForSequenceClassification class with one label: the base
# model and `score`, a Linear(hidden, 1, bias=False) on the last non-pad token; its state-dict keys are the ones
# AutoModelForSequenceClassification.from_pretrained reads, so an export loads there as it is.
REWARD_HEAD = "score"
SEQ_CLS = "ForSequenceClassification"


def is_reward_config(hf_config: PretrainedConfig) -> bool:
    """Whether `hf_config` describes a reward model: a sequence-classification architecture with one label."""
    archs = getattr(hf_config, "architectures", None) or []
    return bool(archs) and archs[0].endswith(SEQ_CLS) and getattr(hf_config, "num_labels", None) == 1


def as_reward_config(hf_config: PretrainedConfig, pad_token_id: int) -> PretrainedConfig:
    """`hf_config` (a causal LM's, or a reward model's) made the family's sequence-classification model with one
    label. The head scores the last token that is not `pad_token_id` (transformers' rule), so the pad id is the
    one batches are padded with: training and a loaded export pick the same token."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    name = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(hf_config.model_type)
    if name is None:
        raise UserError(f"model: transformers has no sequence-classification model for {hf_config.model_type!r}; "
                        "train.objective rm needs one (its score head); pick another model family")
    hf_config.architectures = [name]
    hf_config.num_labels = 1
    hf_config.pad_token_id = pad_token_id
    return hf_config


def build_meta_model(hf_config: PretrainedConfig, attn_implementation: str, dtype: torch.dtype,
                     trust_remote_code: bool) -> nn.Module:
    """The model's modules with parameters on the meta device (no memory used) and buffers as its constructor
    computed them (on the CPU; kept for `materialize`): the causal LM, or for a reward config
    (`is_reward_config`) the family's sequence-classification model."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if is_reward_config(hf_config) else AutoModelForCausalLM
    hf_config.use_cache = False
    with _ParamsOnMeta():
        try:
            model = auto.from_config(
                hf_config, attn_implementation=attn_implementation, dtype=dtype, trust_remote_code=trust_remote_code
            )
        except (ValueError, ImportError) as e:
            raise UserError(f"model: cannot build {hf_config.model_type!r} "
                            f"with attn_implementation={attn_implementation!r}: "
                            f"{str(e).splitlines()[0]}") from None
    # Small (a few KiB per model); the model's own buffers are replaced by to_empty, these copies are not.
    setattr(model, _BUFFERS, {n: b.detach() for n, b in model.named_buffers() if not b.is_meta})
    return model


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, in order: the outermost modules of the classes named in `_no_split_modules`, else
    the longest ModuleList.

    Outermost: Mamba lists both its block and the mixer inside it; sharding both would make the mixer a unit of
    its own inside its block's, applied after the block's (`fully_shard` must go inner first), and its weights
    would stay sharded in the block's forward."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks: list[nn.Module] = []
    inside: set[int] = set()  # modules under a block already taken (modules() lists a parent before its children)
    for m in model.modules():
        if id(m) in inside:
            continue
        if type(m).__name__ in names:
            blocks.append(m)
            inside.update(id(x) for x in m.modules())
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if not lists:
        raise UserError(f"model: cannot find transformer blocks in {type(model).__name__} "
                        "(no _no_split_modules, no layer list)")
    return list(max(lists, key=len))


def check_context_length(hf_config: PretrainedConfig, max_length: int) -> Optional[str]:
    """A warning when data.max_length is above the model's max_position_embeddings; None when it fits or the
    config has no such field. (Packed rows restart positions per example, so max_length is the longest.)"""
    limit = getattr(hf_config, "max_position_embeddings", None)
    if not isinstance(limit, int) or isinstance(limit, bool) or max_length <= limit:
        return None
    return (f"warning: data.max_length {max_length} is above the model's max_position_embeddings {limit}: "
            f"positions past {limit} were never trained (and models with learned position embeddings fail); "
            f"lower data.max_length to {limit}, or extend the model's context (rope_scaling)")


# ----------------------------------------------------------------------------- counting


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(hf_config: PretrainedConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N (N without the input embedding lookup, with lm_head) + 12*L*h*s attention."""
    hidden = hf_config.hidden_size
    layers = hf_config.num_hidden_layers
    embed = hf_config.vocab_size * hidden
    tied = getattr(hf_config, "tie_word_embeddings", False)
    n_compute = n_params - embed + (embed if tied else 0)
    return 6.0 * n_compute + 12.0 * layers * hidden * seq_len


# ----------------------------------------------------------------------------- materialising shards


def _local_slices(param: torch.Tensor) -> tuple[slice, ...]:
    """Index of this rank's shard inside the full tensor."""
    if not isinstance(param, DTensor):
        return tuple(slice(0, s) for s in param.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + s) for o, s in zip(offset, shape))


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def owned_params(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
    """(module name, module, attribute, param) for every distinct parameter, in a fixed order."""
    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        for attr, p in mod.named_parameters(recurse=False):
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            yield mod_name, mod, attr, p


def _module_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


@torch.no_grad()
def init_random(model: nn.Module, seed: int, device: Optional[torch.device] = None) -> None:
    """Hugging Face init per module on a full-size copy on `device`, then keep the local rows.

    Seeding per module name makes the weights independent of world size and of
    the DTensor RNG (which on CPU meshes can repeat shards across ranks); they
    depend on the device type (CPU and CUDA generators differ). `device`
    defaults to where the local shards live; on a GPU this takes seconds where
    a CPU copy of a 1B model takes about a minute. Buffers are not touched:
    they hold the constructor's values (`restore_buffers`).
    """
    done: set[int] = set()
    for mod_name, mod in model.named_modules():
        params = {a: p for a, p in mod.named_parameters(recurse=False) if p is not None and id(p) not in done}
        if not params:
            continue
        proxy = copy.copy(mod)  # same class (so _init_weights dispatches right), own parameter dict
        # and own buffers: theirs keep the constructor's values (`restore_buffers`), whatever _init_weights does
        proxy._buffers = {a: None if b is None else b.clone() for a, b in mod._buffers.items()}
        first = next(iter(params.values()), None)
        where = device or (local_tensor(first).device if first is not None else None)
        proxy._parameters = {  # None entries (e.g. bias=False) stay None
            a: None if p is None else nn.Parameter(torch.full(tuple(p.shape), float("nan"), device=where),
                                                   requires_grad=False)
            for a, p in mod._parameters.items()
        }
        torch.manual_seed(_module_seed(seed, mod_name))
        model._init_weights(proxy)
        for attr, p in params.items():
            full = proxy._parameters[attr]
            if torch.isnan(full).any():  # a parameter the model's own init does not cover
                full.normal_(0.0, 0.02) if full.dim() > 1 else full.zero_()
            local_tensor(p).copy_(full[_local_slices(p)].to(p.dtype))
            done.add(id(p))


def safetensors_index(folder: str) -> dict[str, Path]:
    """Checkpoint key -> file for a Hugging Face folder (sharded with an index, or one model.safetensors)."""
    root = Path(folder)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        raw = read_json(index, "a safetensors index")
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise FileError(f"{index}: key 'weight_map': expected a mapping of weight name -> file name; the index "
                            "is damaged: download or save the model again")
        return {k: root / v for k, v in weight_map.items()}
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise UserError(f"model.path: {folder}: no *.safetensors weights (only safetensors are loaded; "
                        "convert .bin/.pt weights first, or set model.random_init=true)")
    out: dict[str, Path] = {}
    for f in files:
        handle = SafetensorsFile(f)  # a damaged or truncated file: one line naming it
        try:
            out.update(dict.fromkeys(handle.keys(), f))
        finally:
            handle.close()
    return out


@torch.no_grad()
def load_pretrained(model: nn.Module, folder: str, skip: frozenset[str] = frozenset()) -> None:
    """Each rank reads only the rows of its own shards from the safetensors files (plain reads, no mmap).

    File keys map to parameters and persistent buffers by transformers' own conversion rules (`weightmap`): a
    fused MoE parameter (`experts.gate_up_proj` [E, 2I, H]) is read from the per-expert tensors of the files, only
    the experts and rows of this rank's shard, and a renamed key (MiniMax-M2's `block_sparse_moe.` -> `mlp.`) is
    read under its file name, buffers included. `skip`: parameter names the files do not hold (adapters)."""
    index = safetensors_index(folder)
    handles: dict[Path, SafetensorsFile] = {}
    try:
        shapes: dict[str, tuple[int, ...]] = {}
        for key, f in index.items():
            h = _open(handles, f)
            if key not in h.header:
                raise UserError(f"model.path: {f}: weight '{key}' is listed in the index but not in this file")
            shapes[key] = h.shape(key)
        params = [x for x in owned_params(model) if (f"{x[0]}.{x[2]}" if x[0] else x[2]) not in skip]
        names = [f"{m}.{a}" if m else a for m, _mod, a, _p in params]
        buffers = dict(persistent_buffers(model))
        wanted = {**{n: tuple(p.shape) for n, (*_, p) in zip(names, params)},
                  **{n: tuple(b.shape) for n, b in buffers.items()}}
        sources = plan_sources(model, list(wanted), shapes, wanted, folder)
        for name, (*_, p) in zip(names, params):
            src = sources[name]
            if not src.pieces:
                looked = ", ".join(f"'{k}'" for k in src.looked_for)
                raise UserError(f"model.path: {folder}: weight '{name}' is missing from the safetensors files "
                                f"(looked for {looked}); is this checkpoint for another architecture?")
            _check_shape(src.pieces, shapes, index, "weight", tuple(p.shape))
            read_pieces(src.pieces, shapes, index, handles, _local_slices(p), local_tensor(p))
        load_buffers(buffers, sources, shapes, index, handles, folder)
    finally:
        for h in handles.values():
            h.close()


def _check_shape(pieces: list[Piece], shapes: dict[str, tuple[int, ...]], index: dict[str, Path], what: str,
                 expected: tuple[int, ...]) -> None:
    """A tensor read from one file key must have the model's shape (fused pieces are checked by `weightmap`)."""
    one = pieces[0] if len(pieces) == 1 else None
    if one and not (one.stacked or one.extent or one.dims) and shapes[one.key] != expected:
        key = one.key
        raise UserError(f"model.path: {index[key]}: {what} '{key}' has shape {list(shapes[key])}, "
                        f"the model expects {list(expected)}")


def persistent_buffers(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(state-dict key, buffer) for every distinct persistent buffer (those in state_dict, e.g. DeepSeek-V3's
    router `e_score_correction_bias`), in a fixed order."""
    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        for attr, b in mod._buffers.items():
            if b is None or attr in mod._non_persistent_buffers_set or id(b) in seen:
                continue
            seen.add(id(b))
            yield (f"{mod_name}.{attr}" if mod_name else attr), b


def _open(handles: dict[Path, SafetensorsFile], f: Path) -> SafetensorsFile:
    if f not in handles:
        if not f.is_file():
            raise UserError(f"model.path: {f}: listed in model.safetensors.index.json but missing")
        handles[f] = SafetensorsFile(f)
    return handles[f]


def read_pieces(pieces: list[Piece], shapes: dict[str, tuple[int, ...]], index: dict[str, Path],
                handles: dict[Path, SafetensorsFile], local: tuple[slice, ...], out: torch.Tensor) -> None:
    """out <- the part of the parameter in `local` (this rank's slices), read from the file tensors that fall in it.

    A stacked piece (one expert) covers one index of dim 0; a rank reads only the experts in its rows. A piece
    that is a window of its file tensor (a `Split` target, `Interleave`d rows) reads only the file rows behind
    this rank's rows: with a step (every other row), the span from the first to the last of them, once, then
    keeps every step-th."""
    for piece in pieces:
        start, extent, step = piece.window(shapes[piece.key])
        if piece.stacked:  # parameter dim 0 is the expert index; the file tensor's dims follow it
            start, extent, step = (0, *start), (1, *extent), (1, *step)
        src, dst = [], []
        for d, (lo, n) in enumerate(zip(piece.offset, extent)):
            a, b = max(lo, local[d].start), min(lo + n, local[d].stop)
            if a >= b:
                break
            first = start[d] + step[d] * (a - lo)
            src.append(slice(first, first + step[d] * (b - a - 1) + 1))
            dst.append(slice(a - local[d].start, b - local[d].start))
        else:
            if piece.stacked:
                src, dst[0], step = src[1:], dst[0].start, step[1:]  # the file tensor is one index of dim 0
            handle = _open(handles, index[piece.key])
            target = out[tuple(dst)]
            if all(s == 1 for s in step) and not piece.dims:
                handle.read_into(piece.key, tuple(src), target)
            else:
                _read_strided(handle, piece.key, src, step, piece.dims or tuple(range(len(src))), target)


def _read_strided(handle: SafetensorsFile, key: str, src: list[slice], step: tuple[int, ...],
                  dims: tuple[int, ...], target: torch.Tensor) -> None:
    """target <- every step-th element of the file tensor from `src`'s starts (both in parameter dim order;
    parameter dim d is file dim dims[d]). The file rows are read as one span (the first to the last wanted row),
    whole, so the span is one contiguous byte range (the plain-read path, not safetensors' memory map); for a
    transposed tensor a rank's rows are file columns, and the span is the whole tensor."""
    shape = handle.shape(key)
    want: list = [None] * len(dims)  # (slice, step) per file dim
    for d, f in enumerate(dims):
        want[f] = (src[d], step[d])
    span = [want[0][0], *(slice(0, n) for n in shape[1:])]
    buf = torch.empty([s.stop - s.start for s in span], dtype=target.dtype)
    handle.read_into(key, tuple(span), buf)
    picked = buf[tuple(slice(s.start - w.start, s.stop - w.start, st) for (s, st), w in zip(want, span))]
    target.copy_(picked.permute(dims))


@torch.no_grad()
def restore_buffers(model: nn.Module) -> None:
    """Every buffer <- the value the model's constructor computed (recorded by `build_meta_model`).

    A buffer the constructor made above BUILD_ON_CPU_LIMIT elements has no recorded value: it is recomputed by
    the model's `_init_weights` when its module owns no parameters (the old rule), and named in one line."""
    saved = getattr(model, _BUFFERS, None) or {}
    unknown = []
    for mod_name, mod in model.named_modules():
        for attr, b in mod._buffers.items():
            if b is None:
                continue
            name = f"{mod_name}.{attr}" if mod_name else attr
            if name in saved:
                local_tensor(b).copy_(saved[name])
            elif not any(True for _ in mod.parameters(recurse=False)):
                model._init_weights(mod)
                unknown.append(name)
            else:
                unknown.append(name)
    if unknown:
        log.info(f"model: buffer(s) {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} were too large to "
                 "compute at build time; recomputed by the model's _init_weights where it can")


@torch.no_grad()
def load_buffers(buffers: dict[str, torch.Tensor], sources: dict, shapes: dict[str, tuple[int, ...]],
                 index: dict[str, Path], handles: dict[Path, SafetensorsFile], folder: str) -> None:
    """Persistent buffers the safetensors files hold (under the file key transformers' rules map to their
    state-dict key, `sources`) are read through the loader's open files; the others keep the constructor's value
    (`restore_buffers`), named in one line."""
    missing = []
    for key, b in buffers.items():
        pieces = sources[key].pieces
        if not pieces:
            missing.append(key)
            continue
        _check_shape(pieces, shapes, index, "buffer", tuple(b.shape))
        read_pieces(pieces, shapes, index, handles, _local_slices(b), local_tensor(b))
    if missing:
        log.info(f"model.path: {folder}: {len(missing)} persistent buffer(s) not in the safetensors files, kept at "
                 f"the model's initial values: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")


@torch.no_grad()
def move_buffers(model: nn.Module, device: torch.device) -> None:
    """Every buffer to `device` (a buffer shared by several modules stays one tensor). FSDP2 moves parameters
    only: with parallel.cpu_offload the model is materialised on the CPU, and its buffers must still be where
    the compute runs (DeepSeek-V3's router adds e_score_correction_bias to CUDA scores; RoPE's inv_freq would
    be copied to the GPU in every forward)."""
    moved: dict[int, torch.Tensor] = {}
    for mod in model.modules():
        for attr, b in mod._buffers.items():
            if b is not None and b.device != device:
                mod._buffers[attr] = moved.setdefault(id(b), b.to(device))


def materialize(model: nn.Module, device: torch.device, seed: int, weights_from: Optional[str],
                init_device: Optional[torch.device] = None, skip: frozenset[str] = frozenset()) -> None:
    """Allocate local shards on `device` and fill them (pretrained, or random init computed on `init_device`,
    default `device`: a GPU when shards are offloaded to the CPU, since CPU init of a large model is slow).
    Buffers get their constructor values first; loading then reads the persistent ones the files hold."""
    model.to_empty(device=device)
    restore_buffers(model)
    if weights_from is not None:
        load_pretrained(model, weights_from, skip)  # `skip` (adapters) are filled by their owner
    else:
        init_random(model, seed, init_device or device)


def fresh_reward_head(model: nn.Module, hf_config: PretrainedConfig, weights_from: Optional[str]) -> frozenset[str]:
    """The reward head's parameters that start at zero: all of them unless `weights_from` (an earlier reward model)
    holds them. A zero head scores every sequence 0, so the first step's pairwise loss is exactly ln 2."""
    if not is_reward_config(hf_config):
        return frozenset()
    names = {n for n, _ in model.named_parameters() if n.split(".")[0] == REWARD_HEAD}
    held = set(safetensors_index(weights_from)) if weights_from is not None else set()
    return frozenset(names - held)


@torch.no_grad()
def zero_params(model: nn.Module, names: frozenset[str]) -> None:
    """Zero the local shards of the parameters `names`."""
    for name, p in model.named_parameters():
        if name in names:
            local_tensor(p).zero_()
