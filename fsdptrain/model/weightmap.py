"""Which safetensors tensors make up each model parameter, by transformers' own conversion rules.

transformers 5 keeps checkpoints in the hub's layout (e.g. one tensor per MoE expert,
`...block_sparse_moe.experts.3.w1.weight`) and converts while loading: it renames keys and
fuses tensors (experts stacked on dim 0, gate and up concatenated into `gate_up_proj`). The
rules are declared per architecture in `transformers.conversion_mapping`; we import them
(`get_model_conversion_mapping`, the same call `from_pretrained` makes) and apply their key
renaming (`rename_source_key`), so a checkpoint maps to the same parameters as in
transformers. What we do ourselves is turn a rule's operations into *pieces*: each
parameter is a list of (file key, where that tensor sits in the parameter), so a rank can
read only the parts that fall in its shard (its experts, its rows) and never builds a fused
tensor whole. The operations mapped are those whose result is a rearrangement of file
tensors: `MergeModulelist` on dim 0 (then or alone `Concatenate`) fuses several tensors into one
parameter; `Split`/`Chunk` cut one file tensor (Sarvam-MoE's `query_key_value`) into several
parameters, each a window of it; `Interleave` (Inkling2's `w13_weight`, gate and up rows
alternating) makes a parameter of every other row of one tensor; `Inkling2UnpadVocab` keeps the
leading rows; `Transpose` (Ergo's router, stored [in, out]) swaps two dims. A piece then names a
strided, possibly transposed window of its file tensor, so a rank still reads only the file rows
behind its own rows (all rows of a transposed tensor: its rows are file columns). A checkpoint
that needs another operation is refused.

Saving goes the other way as `save_pretrained` does (transformers' `revert_weight_conversion`),
one group of tensors at a time (`save_groups`, `to_saved_layout`), so exports stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from ..core.errors import UserError


@dataclass(frozen=True)
class Piece:
    """One file tensor (or a window of it) inside a parameter: it fills `offset[d] : offset[d] + extent[d]` of
    every parameter dim d; `stacked`: the file tensor is one slice along the parameter's dim 0 (an expert), at
    index offset[0]. The window, per file dim: element i of the piece is file index `start + step * i`, `extent`
    elements (all three empty: the whole file tensor, extent its shape). `dims`: parameter dim d is file dim
    dims[d] (a `Transpose`; empty: the same order)."""
    key: str
    offset: tuple[int, ...]
    stacked: bool
    start: tuple[int, ...] = ()
    extent: tuple[int, ...] = ()
    step: tuple[int, ...] = ()
    dims: tuple[int, ...] = ()

    def window(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(start, extent, step) in parameter dim order (past the expert index of a stacked piece), the defaults
        filled in for a file tensor of this shape."""
        n = len(shape)
        start, extent, step = self.start or (0,) * n, self.extent or tuple(shape), self.step or (1,) * n
        order = self.dims or tuple(range(n))
        return tuple(start[f] for f in order), tuple(extent[f] for f in order), tuple(step[f] for f in order)


@dataclass
class ParamSource:
    """How one parameter is read: its pieces, or the file keys looked for when it is missing."""
    name: str
    pieces: list[Piece]
    looked_for: list[str]


def conversion_rules(model: nn.Module) -> list:
    """transformers' weight transforms for this model (renamings and converters), as `from_pretrained` uses them.

    FSDP2 gives the sharded root a class of its own (`FSDP<Name>`); a shallow copy with the original class is
    asked instead, so class-specific rules are found as for the plain model."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    return get_model_conversion_mapping(_plain_model(model))


def plan_sources(model: nn.Module, param_names: list[str], file_shapes: dict[str, tuple[int, ...]],
                 param_shapes: dict[str, tuple[int, ...]], where: str) -> dict[str, ParamSource]:
    """For each parameter name, the file tensors that compose it (by transformers' rules for this model).

    file_shapes: every key of the checkpoint -> its shape. A parameter whose pieces are missing gets no pieces
    and the keys that were looked for; a rule that cannot be read shard by shard, or pieces that do not add up
    to the parameter's shape, raise a one-line UserError (`where` names the folder)."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    rules = conversion_rules(model)
    renamings = [r for r in rules if isinstance(r, WeightRenaming)]
    converters = [r for r in rules if isinstance(r, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    wanted = dict.fromkeys(param_names, True)
    base_prefix = getattr(model, "base_model_prefix", None)

    direct: dict[str, str] = {}  # param -> the one file key renamed to it
    fused: dict[str, tuple[object, dict[str, list[str]]]] = {}  # param -> (converter, source pattern -> keys)
    split: dict[str, tuple[object, str, list[str]]] = {}  # param -> (converter, its file key, all its targets)
    for key in sorted(file_shapes, key=dot_natural_key):  # transformers' order: experts 0, 1, ..., 10 (natural sort)
        target, pattern = rename_source_key(key, renamings, converters, base_prefix, wanted)
        if target not in wanted and key in wanted:  # as transformers: a key that needs no renaming
            target, pattern = key, None
        if target not in wanted:
            continue
        if pattern is None:
            direct.setdefault(target, key)
        elif len(by_pattern[pattern].target_patterns) > 1:  # one file tensor cut into several parameters
            targets = _split_targets(by_pattern[pattern], target)
            for t in targets:
                split.setdefault(t, (by_pattern[pattern], key, targets))
        else:
            entry = fused.setdefault(target, (by_pattern[pattern], {}))
            entry[1].setdefault(pattern, []).append(key)

    out: dict[str, ParamSource] = {}
    for name in param_names:
        if name in split:
            converter, key, targets = split[name]
            pieces = [_split_piece(converter, key, targets, targets.index(name), file_shapes, param_shapes,
                                   model_type, where)]
        elif name in fused:
            converter, keys = fused[name]
            pieces = _fused_pieces(converter, keys, file_shapes, name, param_shapes[name], model_type, where,
                                   _looked_for(name, rules))
        elif name in direct:
            pieces = [Piece(direct[name], (0,) * len(param_shapes[name]), stacked=False)]
        else:
            pieces = []
        out[name] = ParamSource(name, pieces, [] if pieces else _looked_for(name, rules))
    return out


def _fused_pieces(converter, keys: dict[str, list[str]], file_shapes: dict[str, tuple[int, ...]], name: str,
                  param_shape: tuple[int, ...], model_type: str, where: str, looked_for: list[str]) -> list[Piece]:
    """The pieces of a parameter that a converter fuses from several file tensors (looked_for: the file key
    patterns, one per source of the rule, for the error when some are missing)."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = list(converter.operations)
    if len(ops) == 1 and type(ops[0]).__name__ in WINDOW_OPS and len(converter.target_patterns) == 1:
        return _window_pieces(converter, keys, file_shapes, name, param_shape, model_type, where)
    stacked = bool(ops) and type(ops[0]) is MergeModulelist and ops[0].dim == 0
    if stacked:
        ops = ops[1:]
    concat_dim = None
    if len(ops) == 1 and type(ops[0]) is Concatenate:
        concat_dim = ops.pop().dim
    if ops or not (stacked or concat_dim is not None) or len(converter.target_patterns) != 1:
        raise _unreadable(converter, name, model_type, where)
    absent = [looked_for[i] for i, p in enumerate(converter.source_patterns)
              if not keys.get(p) and i < len(looked_for)]
    if absent:
        looked = ", ".join(f"'{k}'" for k in looked_for[:len(converter.source_patterns)])
        raise UserError(f"model.path: {where}: weight '{name}' is incomplete in the safetensors files: no key "
                        f"matches '{absent[0]}' (transformers' {model_type!r} rules fuse it from {looked}); "
                        "is this checkpoint for another architecture?")
    pieces: list[Piece] = []
    along = 0  # offset along the concatenation dim
    shape: Optional[list[int]] = None
    for pattern in converter.source_patterns:  # the rule's order (gate before up), not the files'
        pattern_keys = keys.get(pattern, [])
        if not pattern_keys:
            continue
        first = tuple(file_shapes[pattern_keys[0]])
        bad = [k for k in pattern_keys if tuple(file_shapes[k]) != first]
        if bad:
            raise UserError(f"model.path: {where}: weight '{bad[0]}' has shape {list(file_shapes[bad[0]])}, "
                            f"unlike '{pattern_keys[0]}' {list(first)} that it is fused with into '{name}'")
        if stacked and len(pattern_keys) != param_shape[0]:
            raise UserError(f"model.path: {where}: weight '{name}' has {param_shape[0]} experts, the safetensors "
                            f"files hold {len(pattern_keys)} tensors matching '{pattern}' for it "
                            f"('{pattern_keys[0]}', ...): some experts are missing, or the config's expert count "
                            "does not match the checkpoint")
        if stacked:
            part = [len(pattern_keys), *first]
        elif len(pattern_keys) == 1:
            part = list(first)
        else:
            raise UserError(f"model.path: {where}: weights {pattern_keys[:3]} all map to '{name}'; "
                            "is this checkpoint for another architecture?")
        for i, key in enumerate(pattern_keys):
            offset = [0] * len(part)
            if stacked:
                offset[0] = i
            if concat_dim is not None:
                offset[concat_dim] = along
            pieces.append(Piece(key, tuple(offset), stacked))
        if shape is None:
            shape = part
        elif concat_dim is not None and len(part) == len(shape):
            shape[concat_dim] += part[concat_dim]
        if concat_dim is not None:
            along += part[concat_dim]
    if shape is None or tuple(shape) != tuple(param_shape):
        got = "none" if shape is None else list(shape)
        files = ", ".join(f"'{k}'" for k in (pieces[0].key, pieces[-1].key)) if pieces else "no file keys"
        raise UserError(f"model.path: {where}: weight '{name}' fused by transformers' {model_type!r} rules from "
                        f"{len(pieces)} tensors ({files}, ...) has shape {got}, the model expects "
                        f"{list(param_shape)}")
    return pieces


# Single-tensor operations whose result is a (strided) window of the file tensor: read by `_window_pieces`.
WINDOW_OPS = ("Interleave", "Inkling2UnpadVocab", "Transpose")


def _unreadable(converter, name: str, model_type: str, where: str) -> UserError:
    names = ", ".join(type(op).__name__ for op in converter.operations)
    return UserError(f"model.path: {where}: model_type {model_type!r}: transformers converts its checkpoint with "
                     f"{names} (for {name!r}), which fsdptrain cannot read shard by shard; convert the checkpoint "
                     "to the model's own parameter names first")


def _split_targets(converter, first: str) -> list[str]:
    """The parameters a one-to-many converter makes of one file key, in its target order: `first` (the key as
    `rename_source_key` renames it, with the first target pattern) with that pattern replaced by each target, as
    `WeightConverter.convert` names them."""
    patterns = list(converter.target_patterns)
    prefix, _, suffix = first.partition(patterns[0])
    return [prefix + t + suffix for t in patterns]


def _split_piece(converter, key: str, targets: list[str], index: int, file_shapes: dict[str, tuple[int, ...]],
                 param_shapes: dict[str, tuple[int, ...]], model_type: str, where: str) -> Piece:
    """Target `index` of a `Split` (sizes: the targets' own, as transformers takes them from the model) or `Chunk`
    (equal parts) of one file tensor: a window along the split dim, so a rank reads only the rows it holds."""
    from transformers.core_model_loading import Chunk, Split

    ops = list(converter.operations)
    op = ops[0] if len(ops) == 1 else None
    name = targets[index]
    if type(op) not in (Split, Chunk) or getattr(op, "num_shards_attribute", None) is not None:
        raise _unreadable(converter, name, model_type, where)
    absent = [t for t in targets if t not in param_shapes]
    if absent:
        raise UserError(f"model.path: {where}: weight '{key}' is split by transformers' {model_type!r} rules into "
                        f"{', '.join(repr(t) for t in targets)}, and the model has no '{absent[0]}'; "
                        "is this checkpoint for another architecture?")
    shape, dim = tuple(file_shapes[key]), op.dim
    if type(op) is Split:
        sizes = [param_shapes[t][dim] if len(param_shapes[t]) > dim else -1 for t in targets]
    else:  # torch.chunk's parts: ceil(n / k) each, the last one what is left
        part = -(-shape[dim] // len(targets)) if len(shape) > dim else 0
        sizes = [max(0, min(part, shape[dim] - i * part)) for i in range(len(targets))]
    want = tuple(param_shapes[name])
    fits = (len(want) == len(shape) and sum(sizes) == shape[dim] and want[dim] == sizes[index]
            and all(w == n for d, (w, n) in enumerate(zip(want, shape)) if d != dim))
    if not fits:
        raise UserError(f"model.path: {where}: weight '{key}' has shape {list(shape)}, which transformers' "
                        f"{model_type!r} rules split along dim {dim} into {', '.join(repr(t) for t in targets)}; "
                        f"the model expects {[list(param_shapes[t]) for t in targets]}")
    start = [0] * len(shape)
    start[dim] = sum(sizes[:index])
    return Piece(key, (0,) * len(shape), stacked=False, start=tuple(start), extent=want)


def _window_pieces(converter, keys: dict[str, list[str]], file_shapes: dict[str, tuple[int, ...]], name: str,
                   param_shape: tuple[int, ...], model_type: str, where: str) -> list[Piece]:
    """The pieces of a parameter that one file tensor makes through `Interleave`, `Inkling2UnpadVocab` or
    `Transpose`.

    Interleave(dim) (not inverse) reshapes dim into [n/2, 2] and swaps the two: the parameter's first half along
    dim is the file's even rows, its second half the odd ones (two strided pieces). Inkling2UnpadVocab keeps the
    first rows of the (padded) unembedding: one window of them. Transpose swaps two dims (Ergo's router and shared
    expert, stored [in, out]): a rank's rows are file columns, found in every file row, so the reader reads the
    tensor's rows whole, once per rank (`models.read_pieces`)."""
    op = converter.operations[0]
    found = [k for ks in keys.values() for k in ks]
    if len(found) != 1 or getattr(op, "inverse", False):
        raise _unreadable(converter, name, model_type, where)
    key = found[0]
    shape, want = tuple(file_shapes[key]), tuple(param_shape)
    zeros = (0,) * len(shape)
    if type(op).__name__ == "Transpose":
        order = list(range(len(shape)))
        d0, d1 = op.dim0 % max(len(shape), 1), op.dim1 % max(len(shape), 1)
        order[d0], order[d1] = order[d1], order[d0]
        if getattr(op, "check_dims", False) and shape == want:  # as transformers: stored the model's way already
            return [Piece(key, zeros, stacked=False)]
        if tuple(shape[f] for f in order) != want:
            raise UserError(f"model.path: {where}: weight '{key}' has shape {list(shape)}, the model expects "
                            f"{list(want)} for '{name}' (transposed, dims {d0} and {d1})")
        return [Piece(key, zeros, stacked=False, dims=tuple(order))]
    if type(op).__name__ == "Inkling2UnpadVocab":
        if len(shape) != len(want) or shape[0] < want[0] or shape[1:] != want[1:]:
            raise UserError(f"model.path: {where}: weight '{key}' has shape {list(shape)}, fewer rows than the "
                            f"{list(want)} of '{name}' that transformers' {model_type!r} rules keep of it")
        return [Piece(key, zeros, stacked=False, start=zeros, extent=want)]
    dim = op.dim
    if shape != want or shape[dim] % 2:
        raise UserError(f"model.path: {where}: weight '{key}' has shape {list(shape)}, the model expects "
                        f"{list(want)} for '{name}' (interleaved along dim {dim}, an even size)")
    half = shape[dim] // 2
    extent = tuple(half if d == dim else n for d, n in enumerate(shape))
    step = tuple(2 if d == dim else 1 for d in range(len(shape)))
    pieces = []
    for parity in (0, 1):  # gate rows 0, 2, 4, ... first, then up rows 1, 3, 5, ...
        offset = tuple(parity * half if d == dim else 0 for d in range(len(shape)))
        start = tuple(parity if d == dim else 0 for d in range(len(shape)))
        pieces.append(Piece(key, offset, stacked=False, start=start, extent=extent, step=step))
    return pieces


def _looked_for(name: str, rules: list) -> list[str]:
    """The file keys (or key patterns, `*` for the expert index) that would have been read for `name`."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    keys = [name]
    reverse = [r.reverse_transform() for r in rules]
    for conv in (r for r in reverse if isinstance(r, WeightConverter)):
        match = conv.compiled_sources.search(name)
        if match is not None:  # the fused parameter: one file pattern per source of the forward rule
            keys = [name.replace(match.group(0), t, 1) for t in conv.target_patterns]
            break
    renamed = []
    for key in keys:
        for ren in (r for r in reverse if isinstance(r, WeightRenaming)):
            key, _ = ren.rename_source_key(key)
        renamed.append(key.replace("\\", ""))
    return list(dict.fromkeys([*renamed, *keys]))


# ----------------------------------------------------------------------------- saving: the hub's layout again


def _plain_model(model: nn.Module) -> nn.Module:
    """`model`, or for an FSDP-sharded root a shallow copy with the model's own class (see conversion_rules)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return model
    cls = next(c for c in type(model).__mro__[1:] if not issubclass(c, FSDPModule))
    proxy = cls.__new__(cls)  # not copy.copy: FSDP's __new__ would run the model's __init__
    proxy.__dict__.update(model.__dict__)
    return proxy


def save_groups(model: nn.Module, keys: list[str]) -> list[list[str]]:
    """`keys` (state-dict keys) in the groups that `save_pretrained` converts together, in their first order.

    save_pretrained reverts the load-time rules (`revert_weight_conversion`): a fused parameter (e.g. an expert
    stack) splits back into per-expert tensors, and several parameters that one file tensor was split into merge
    back. A group is the keys one reverse converter collects, as transformers groups them, so converting group by
    group writes what converting the whole state dict at once writes, with one group in memory at a time."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightConverter, apply_converters

    plain = _plain_model(model)
    rules = getattr(plain, "_weight_conversions", None)
    if rules is None:  # as revert_weight_conversion for a model not made by from_pretrained
        rules = [r for r in get_model_conversion_mapping(plain, add_legacy=False) if not isinstance(r, PrefixChange)]
    reverse = [r.reverse_transform() for r in rules[::-1]]
    converters = [r for r in reverse if isinstance(r, WeightConverter)]
    groups: dict[tuple[str, str], list[str]] = {}
    for key in keys:
        renamed, pattern = apply_converters(key, converters) if converters else (key, None)
        groups.setdefault(("fused", renamed) if pattern is not None else ("key", key), []).append(key)
    return list(groups.values())


def to_saved_layout(model: nn.Module, tensors: dict) -> dict:
    """One group of `save_groups` (full tensors by state-dict key) in the layout `save_pretrained` writes: the
    file keys and tensors transformers' own `revert_weight_conversion` makes of them."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(_plain_model(model), dict(tensors))
