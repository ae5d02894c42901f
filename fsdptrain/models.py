"""Build and load Hugging Face causal LMs without materialising them whole on any rank.

The recipe (see `trainer.py`):
  1. `build_meta_model`: the architecture on the meta device (no memory).
  2. `parallelize.apply_fsdp`: shard it (DTensor params, still on meta).
  3. `materialize`: allocate only the local shards, then fill them either from
     the model folder's safetensors (each rank reads just its own rows with
     `get_slice`) or with Hugging Face's own init, computed per module from a
     seed so that every world size produces the same weights.
Non-persistent buffers (RoPE `inv_freq`) are recomputed: `to_empty` leaves
garbage in them and no state dict restores them.
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

from .errors import UserError
from .files import FileError, read_json, reading
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
        if not config_file.is_file():
            raise UserError(f"model.path: {path}: no config.json there; point it at a local Hugging Face model folder")
        raw = read_json(config_file, "a Hugging Face model config")  # not UTF-8, not JSON: one line, with the line
        if not isinstance(raw, dict):
            raise FileError(f"{config_file}: expected a JSON object (a Hugging Face model config), got "
                            f"{type(raw).__name__}; point model.path at a Hugging Face model folder")
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
    if vocab_size is not None:
        fields.setdefault("vocab_size", vocab_size)
    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as e:  # unknown model_type, a field of the wrong type (transformers validates strictly), ...
        detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise UserError(f"model.hf_config: {detail}") from None


def build_meta_model(hf_config: PretrainedConfig, attn_implementation: str, dtype: torch.dtype,
                     trust_remote_code: bool) -> nn.Module:
    """The model's modules with parameters on the meta device (no memory used)."""
    from transformers import AutoModelForCausalLM

    hf_config.use_cache = False
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(
                hf_config, attn_implementation=attn_implementation, dtype=dtype, trust_remote_code=trust_remote_code
            )
        except (ValueError, ImportError) as e:
            raise UserError(f"model: cannot build {hf_config.model_type!r} "
                            f"with attn_implementation={attn_implementation!r}: "
                            f"{str(e).splitlines()[0]}") from None
    return model


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, in order: classes named in `_no_split_modules`, else the longest ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
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
    a CPU copy of a 1B model takes about a minute. Modules' buffers (RoPE
    inv_freq) are recomputed in place by the same call.
    """
    done: set[int] = set()
    for mod_name, mod in model.named_modules():
        params = {a: p for a, p in mod.named_parameters(recurse=False) if p is not None and id(p) not in done}
        has_buffers = any(True for _ in mod.buffers(recurse=False))
        if not params and not has_buffers:
            continue
        proxy = copy.copy(mod)  # same class (so _init_weights dispatches right), own parameter dict
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
def load_pretrained(model: nn.Module, folder: str) -> None:
    """Each rank reads only the rows of its own shards from the safetensors files (plain reads, no mmap).

    File keys map to parameters by transformers' own conversion rules (`weightmap`): a fused MoE parameter
    (`experts.gate_up_proj` [E, 2I, H]) is read from the per-expert tensors of the files, only the experts and
    rows of this rank's shard."""
    index = safetensors_index(folder)
    handles: dict[Path, SafetensorsFile] = {}
    try:
        shapes: dict[str, tuple[int, ...]] = {}
        for key, f in index.items():
            h = _open(handles, f)
            if key not in h.header:
                raise UserError(f"model.path: {f}: weight '{key}' is listed in the index but not in this file")
            shapes[key] = h.shape(key)
        params = list(owned_params(model))
        names = [f"{m}.{a}" if m else a for m, _mod, a, _p in params]
        sources = plan_sources(model, names, shapes, {n: tuple(p.shape) for n, (*_, p) in zip(names, params)},
                               folder)
        for name, (*_, p) in zip(names, params):
            src = sources[name]
            if not src.pieces:
                looked = ", ".join(f"'{k}'" for k in src.looked_for)
                raise UserError(f"model.path: {folder}: weight '{name}' is missing from the safetensors files "
                                f"(looked for {looked}); is this checkpoint for another architecture?")
            if len(src.pieces) == 1 and not src.pieces[0].stacked and shapes[src.pieces[0].key] != tuple(p.shape):
                key = src.pieces[0].key
                raise UserError(f"model.path: {index[key]}: weight '{key}' has shape {list(shapes[key])}, "
                                f"the model expects {list(p.shape)}")
            _read_pieces(src.pieces, shapes, index, handles, _local_slices(p), local_tensor(p))
    finally:
        for h in handles.values():
            h.close()
    init_buffers(model)


def _open(handles: dict[Path, SafetensorsFile], f: Path) -> SafetensorsFile:
    if f not in handles:
        if not f.is_file():
            raise UserError(f"model.path: {f}: listed in model.safetensors.index.json but missing")
        handles[f] = SafetensorsFile(f)
    return handles[f]


def _read_pieces(pieces: list[Piece], shapes: dict[str, tuple[int, ...]], index: dict[str, Path],
                 handles: dict[Path, SafetensorsFile], local: tuple[slice, ...], out: torch.Tensor) -> None:
    """out <- the part of the parameter in `local` (this rank's slices), read from the file tensors that fall in it.

    A stacked piece (one expert) covers one index of dim 0; a rank reads only the experts in its rows."""
    for piece in pieces:
        shape = shapes[piece.key]
        dims = (1,) + tuple(shape) if piece.stacked else tuple(shape)  # the piece's extent in parameter dims
        src, dst = [], []
        for d, (lo, n) in enumerate(zip(piece.offset, dims)):
            a, b = max(lo, local[d].start), min(lo + n, local[d].stop)
            if a >= b:
                break
            src.append(slice(a - lo, b - lo))
            dst.append(slice(a - local[d].start, b - local[d].start))
        else:
            if piece.stacked:
                src, dst[0] = src[1:], dst[0].start  # the file tensor is one index of dim 0
            handles_f = _open(handles, index[piece.key])
            handles_f.read_into(piece.key, tuple(src), out[tuple(dst)])


@torch.no_grad()
def init_buffers(model: nn.Module) -> None:
    """Recompute non-persistent buffers (RoPE inv_freq) of modules that own no parameters."""
    for mod in model.modules():
        if any(True for _ in mod.buffers(recurse=False)) and not any(True for _ in mod.parameters(recurse=False)):
            model._init_weights(mod)


def materialize(model: nn.Module, device: torch.device, seed: int, weights_from: Optional[str],
                init_device: Optional[torch.device] = None) -> None:
    """Allocate local shards on `device` and fill them (pretrained, or random init computed on `init_device`,
    default `device`: a GPU when shards are offloaded to the CPU, since CPU init of a large model is slow)."""
    model.to_empty(device=device)
    if weights_from is not None:
        load_pretrained(model, weights_from)
    else:
        init_random(model, seed, init_device or device)
