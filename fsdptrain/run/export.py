"""Hugging Face model folders: from a live sharded model (end of training) or from a DCP checkpoint.

Both paths stream: weights go to disk one safetensors shard (at most
`max_shard_bytes`) at a time, so neither the exporting rank nor the `fsdptrain
export` process ever holds the whole model. The folder gets
model.safetensors (or model-0000i-of-0000n.safetensors + index), config.json,
generation_config.json, the tokenizer files and `fsdptrain_export.json` (the
marker: what was exported and every file written, with its size). Tied
embeddings are written once (transformers re-ties lm_head on load). Persistent
buffers (the state dict's non-parameter entries, e.g. DeepSeek-V3's router
`e_score_correction_bias`) are written too; non-persistent ones never are. The
tensors are written in the layout `save_pretrained` writes (weightmap.save_groups
and to_saved_layout: MoE experts one by one, as on the hub), one group of
tensors converted at a time, so the shard-at-a-time memory bound holds.

An export never deletes or overwrites anything it did not write. The folder is
written into a new temporary folder beside the target (`OUT.tmp-<pid>`) and
renamed into place, so it appears complete or not at all; the target must be
new or empty, or, with overwrite, an earlier fsdptrain export (it has the
marker and nothing the marker does not list), which is moved aside, replaced
and only then deleted file by file. Run directories, checkpoints, the folder
being exported, the current directory, the home folder and their parents are
never a target. See docs/checkpoints.md.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..core import log
from ..core.errors import UserError
from ..core.files import read_json, reading
from ..model.models import is_reward_config, owned_params, persistent_buffers
from ..model.weightmap import save_groups, to_saved_layout
from .checkpoint import MARKER, SUBDIR

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EXPORT_MARKER = "fsdptrain_export.json"  # written into every export: how an earlier export is recognised


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating tensors in the export dtype; integer and boolean buffers as they are."""
    return t.to(dtype=dtype, device="cpu") if t.is_floating_point() else t.to(device="cpu")


def export_dtype(name: str, precision: str) -> torch.dtype:
    """checkpoint.export_dtype / --dtype: auto means the training precision's weights (bf16 when trained in bf16)."""
    if name == "auto":
        name = "bf16" if str(precision).startswith("bf16") else "fp32"
    return EXPORT_DTYPES[name]


class ShardWriter:
    """Collects tensors into size-bounded safetensors files inside `folder`, writing each as it fills."""

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder = folder
        self.max = max_shard_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.files: list[tuple[str, list[str]]] = []  # temporary file name, keys
        self.total = 0

    def add(self, key: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.current and self.current_bytes + n > self.max:
            self.flush()
        self.current[key] = t.contiguous()
        self.current_bytes += n
        self.total += n

    def flush(self) -> None:
        if not self.current:
            return
        from safetensors.torch import save_file

        name = f"part-{len(self.files):05d}.safetensors"
        save_file(self.current, str(self.folder / name), metadata={"format": "pt"})
        self.files.append((name, list(self.current)))
        self.current, self.current_bytes = {}, 0

    def finish(self) -> None:
        """Give the shards their final names (known only now) and write the index when there are several."""
        self.flush()
        n = len(self.files)
        weight_map = {}
        for i, (tmp_name, keys) in enumerate(self.files):
            name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / tmp_name, self.folder / name)
            weight_map.update({k: name for k in keys})
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# ----------------------------------------------------------------------------- where an export may go


class ExportTargetError(UserError):
    """The export's target folder holds something an export must not replace."""


def _run_dir_signs(p: Path) -> list[str]:
    """What makes `p` look like a run directory (empty if it does not)."""
    signs = [n for n in ("config.yaml", "metrics.jsonl") if (p / n).is_file()]
    if (p / SUBDIR).is_dir():
        signs.append(SUBDIR + "/")
    return [] if signs == ["config.yaml"] else signs  # a config.yaml alone is just a file


def _checkpoint_signs(p: Path) -> list[str]:
    return [n for n in (MARKER, ".metadata") if (p / n).is_file()]


def _what_it_is(p: Path) -> Optional[str]:
    """'a run directory (...)' or 'a checkpoint (...)' when `p` is one, else None."""
    if signs := _run_dir_signs(p):
        return f"a run directory ({', '.join(signs)})"
    if signs := _checkpoint_signs(p):
        return f"a checkpoint ({', '.join(signs)})"
    return None


def _within(p: Path, folder: Path) -> bool:
    return p == folder or folder in p.parents


def _read_marker(folder: Path) -> Optional[dict[str, int]]:
    """The files an earlier export wrote (relative path -> size), or None when `folder` is not one."""
    try:
        files = json.loads((folder / EXPORT_MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(files, dict):
        return None
    return {str(k): v for k, v in files.items()}


def _foreign_files(folder: Path, listed: dict[str, int], limit: int = 5) -> list[str]:
    """Files (and links, odd entries) under `folder` that the marker does not list with that size."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        base = Path(dirpath)
        for name in sorted(filenames) + [d for d in sorted(dirnames) if (base / d).is_symlink()]:
            p = base / name
            rel = str(p.relative_to(folder))
            if rel == EXPORT_MARKER:
                continue
            if p.is_symlink() or not p.is_file() or listed.get(rel) != p.stat().st_size:
                found.append(rel)
                if len(found) >= limit:
                    return found
    return found


def check_target(out: str | Path, *, overwrite: bool, where: str, fix: str,
                 protect: tuple[tuple[Path, str], ...] = ()) -> None:
    """Refuse (ExportTargetError) a target folder an export must not write or replace.

    `where` opens the message (e.g. "export --out x"), `fix` says what to do instead, `protect` are
    (folder, what it is) pairs the target may neither be nor contain (the checkpoint being exported).
    """
    given = Path(out)
    o = given.resolve()

    def refuse(what: str, also: str = "") -> ExportTargetError:
        return ExportTargetError(f"{where}: {what}; {fix}{also}")

    home = Path.home().resolve()
    cwd = Path.cwd().resolve()
    if o == Path(o.anchor):
        raise refuse("is the filesystem root")
    checks = [(home, "your home folder"), (cwd, "the current directory")]
    for folder, what in [*checks, *((Path(p).resolve(), w) for p, w in protect)]:
        if o == folder:
            raise refuse(f"is {what}")
        if _within(folder, o):
            raise refuse(f"contains {what} ({folder})")
    if given.is_symlink():
        raise refuse(f"is a symbolic link (to {os.readlink(given)}); an export is written to a real folder")
    if not o.exists():
        return
    if not o.is_dir():
        raise refuse("is a file, not a folder")
    if (kind := _what_it_is(o)) is not None:
        raise refuse(f"is {kind}, which an export never replaces")
    try:
        entries = sorted(o.iterdir())
    except OSError as e:
        raise refuse(f"cannot list the folder ({e.strerror})") from None
    if not entries:
        return  # an empty folder: the export takes its place
    for child in entries[:1000]:
        if child.is_dir() and not child.is_symlink() and (kind := _what_it_is(child)) is not None:
            raise refuse(f"contains {child.name}, {kind}, which an export never replaces")
    if not overwrite:
        raise refuse("folder exists and is not empty", ", or add --overwrite to replace an earlier fsdptrain "
                                                       "export there")
    listed = _read_marker(o)
    if listed is None:
        raise refuse(f"folder is not empty and is not an fsdptrain export (no {EXPORT_MARKER}): it is not ours, "
                     "so it is not replaced")
    foreign = _foreign_files(o, listed)
    if foreign:
        raise refuse(f"holds files the earlier export did not write, or that changed since ({', '.join(foreign)}), "
                     "so it is not replaced")


def _beside(out: Path, tag: str) -> Path:
    """A new folder name next to `out` that nothing uses: OUT.<tag>-<pid>[-n]."""
    base = out.with_name(f"{out.name}.{tag}-{os.getpid()}")
    p, n = base, 1
    while p.exists() or p.is_symlink():
        n += 1
        p = base.with_name(f"{base.name}-{n}")
    return p


def _begin(out: Path, where: str) -> Path:
    """Create the temporary folder beside `out` the export is written into."""
    o = out.resolve()
    try:
        o.parent.mkdir(parents=True, exist_ok=True)
        while True:
            tmp = _beside(o, "tmp")
            try:
                tmp.mkdir()
                return tmp
            except FileExistsError:  # taken between the check and the mkdir: try the next name
                continue
    except OSError as e:
        raise ExportTargetError(f"{where}: cannot create a folder in {o.parent} ({e.strerror}); "
                                "give a folder you can write to") from None


def _remove_export(folder: Path) -> bool:
    """Delete an earlier export that was moved aside: only the files its marker lists, then the emptied folders.
    Returns False (and leaves the rest) when something else is in it."""
    listed = _read_marker(folder) or {}
    for rel in listed:
        p = folder / rel
        if (p.is_file() and not p.is_symlink() and _within(p.resolve(), folder.resolve())
                and p.stat().st_size == listed[rel]):
            p.unlink()
    (folder / EXPORT_MARKER).unlink(missing_ok=True)
    for dirpath, _dirs, _files in os.walk(folder, topdown=False):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass  # not empty: holds something the export did not write
    return not folder.exists()


def _write_meta(tmp: Path, hf_config: PretrainedConfig, tokenizer: Optional[PreTrainedTokenizerBase],
                dtype: torch.dtype) -> None:
    cfg = hf_config.__class__.from_dict(hf_config.to_dict())
    cfg.dtype = dtype
    cfg.use_cache = True
    cfg.save_pretrained(str(tmp))
    try:
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(cfg).save_pretrained(str(tmp))
    except Exception:  # noqa: BLE001  generation config is a convenience; never fail an export for it
        pass
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))


def _publish(tmp: Path, out: Path, source: str, dtype: torch.dtype, check: dict) -> bool:
    """Seal `tmp` with the marker and rename it to `out`; an earlier export there is moved aside, replaced, then
    deleted. Returns whether an earlier export was replaced."""
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    marker = {"format": 1, "source": source, "dtype": str(dtype).removeprefix("torch."), "files": files}
    (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    check_target(out, **check)  # again: the folder may have changed while the weights were written
    o = out.resolve()
    where = check["where"]
    try:
        if not o.exists() or not any(o.iterdir()):
            os.replace(tmp, o)  # a new name, or an empty folder (rename replaces only an empty one)
            return False
        old = _beside(o, "old")
        os.rename(o, old)
        try:
            os.rename(tmp, o)
        except OSError:
            os.rename(old, o)
            raise
    except OSError as e:
        raise ExportTargetError(f"{where}: cannot put the export in place ({e.strerror}); it changed while the "
                                f"export was written, or is not writable: give a new folder") from None
    if not _remove_export(old):
        log.info(f"export: kept {old}: it holds files the earlier export did not write")
    return True


def _write_export(out: Path, source: str, dtype: torch.dtype, check: dict, write) -> bool:
    """Run `write(tmp)` into a new temporary folder beside `out`, then publish it; the temporary folder is removed
    if anything fails (it is the only thing this export wrote)."""
    tmp = _begin(out, check["where"])
    try:
        write(tmp)
        return _publish(tmp, out, source, dtype, check)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def training_export_check(out: Path) -> dict:
    """check_target's arguments for checkpoint.export_hf's output_dir/hf: it replaces only its own earlier export."""
    return {"overwrite": True, "where": f"checkpoint.export_hf: {out}",
            "fix": "move it out of the way, or set checkpoint.export_hf=false (fsdptrain export writes one from "
                   "the last checkpoint later)"}


@torch.no_grad()
def export_hf(model: nn.Module, hf_config: PretrainedConfig, tokenizer: Optional[PreTrainedTokenizerBase],
              out_dir: str | Path, is_main: bool, dtype: torch.dtype = torch.float32,
              max_shard_bytes: int = 5 * 10**9) -> None:
    """Export a live (FSDP-sharded) model; a collective: every rank calls it, rank 0 writes.

    Every rank checks the target first (the output directory is shared), so a refusal stops all ranks before
    the first gather.
    """
    out = Path(out_dir)
    check = training_export_check(out)
    check_target(out, **check)

    def write(tmp: Optional[Path]) -> None:
        writer = ShardWriter(tmp, max_shard_bytes) if tmp is not None else None
        tensors = {f"{m}.{a}" if m else a: p for m, _mod, a, p in owned_params(model)}  # tied weights once
        tensors.update(persistent_buffers(model))
        for group in save_groups(model, list(tensors)):  # the same order on every rank: full_tensor is collective
            full = {k: tensors[k].full_tensor() if isinstance(tensors[k], DTensor) else tensors[k].detach()
                    for k in group}
            if writer is not None:
                for key, t in to_saved_layout(model, full).items():
                    writer.add(key, _cast(t, dtype))
            del full
        if writer is not None:
            writer.finish()
            _write_meta(writer.folder, hf_config, tokenizer, dtype)

    if not is_main:
        write(None)
        return
    _write_export(out, "the model at the end of training", dtype, check, write)


# ----------------------------------------------------------------------------- from a checkpoint


def _batches(groups: list[list[str]], sizes: dict[str, int], limit: int) -> Iterator[list[list[str]]]:
    """Groups of keys (converted together) in batches of at most `limit` bytes (or one group)."""
    batch, total = [], 0
    for group in groups:
        n = sum(sizes[k] for k in group)
        if batch and total + n > limit:
            yield batch
            batch, total = [], 0
        batch.append(group)
        total += n
    if batch:
        yield batch


def _skeleton(raw_config: object, hf_config: PretrainedConfig) -> nn.Module:
    """The model's structure for a checkpoint's keys and shapes, built with the attention implementation the
    checkpoint's config (`raw_config`, its config.json as read) names (`_attn_implementation`), else sdpa, else
    eager (gemma2 and gpt_oss refuse sdpa; attention does not change the weights)."""
    from ..model import models

    saved = raw_config.get("_attn_implementation") if isinstance(raw_config, dict) else None
    tries = [saved] if isinstance(saved, str) and saved else []
    tries += [a for a in ("sdpa", "eager") if a not in tries]
    for i, attn in enumerate(tries):
        try:
            return models.build_meta_model(hf_config, attn, torch.float32, False)
        except UserError:
            if i == len(tries) - 1:
                raise
    raise AssertionError("unreachable")


@torch.no_grad()
def checkpoint_model_files(path: Path) -> tuple[dict, Any, Any]:
    """A checkpoint's hf/ folder: its config.json as written, the transformers config, and the tokenizer (None when
    the run saved none). A damaged file is one line naming it."""
    from transformers import AutoConfig, AutoTokenizer

    hf_dir = path / "hf"
    raw_config = read_json(hf_dir / "config.json", "the model config")
    with reading(hf_dir / "config.json", "the model config"):
        hf_config = AutoConfig.from_pretrained(str(hf_dir))
    tokenizer = None
    if any((hf_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        with reading(hf_dir / "tokenizer.json", "the tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    return raw_config, hf_config, tokenizer


def export_checkpoint(checkpoint: str, out_dir: str, dtype_name: str = "auto",
                      max_shard_bytes: int = 5 * 10**9, overwrite: bool = False, merge: bool = False,
                      base: Optional[str] = None) -> tuple[Path, bool]:
    """Write a Hugging Face folder from a checkpoint alone (one process, one shard in memory at a time).

    `out_dir` must be new or empty; with `overwrite`, an earlier fsdptrain export is replaced. Returns the folder
    and whether an earlier export was replaced."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    from .checkpoint import check_model, resolve_resume, verify_files

    path = resolve_resume(str(Path(checkpoint)), Path(checkpoint), key="export")
    if path is None:
        raise UserError(f"export: {checkpoint}: give a checkpoint folder or a run directory")
    given = Path(checkpoint)
    protect = ((given, "the run directory being exported" if given.resolve() != path.resolve()
                else "the checkpoint being exported"), (path, "the checkpoint being exported"))
    check = {"overwrite": overwrite, "where": f"export --out {out_dir}", "protect": protect,
             "fix": "give a new or empty folder for --out"}
    check_target(out_dir, **check)
    saved = verify_files(path)
    if isinstance(saved.get("finetune"), dict) and saved["finetune"].get("method") in ("lora", "freeze"):
        return Path(out_dir), export_finetuned(path, saved, out_dir, dtype_name, max_shard_bytes, check, merge, base)
    if merge:
        raise UserError(f"export --merge: {path} is not a LoRA checkpoint (nothing to merge); export it without "
                        "--merge")
    raw_config, hf_config, tokenizer = checkpoint_model_files(path)
    dtype = export_dtype(dtype_name, saved.get("precision", "fp32"))

    skeleton = _skeleton(raw_config, hf_config)
    check_model(path, skeleton.state_dict(), saved)
    # Persistent buffers are in the DCP state dict (get_state_dict saves the model's state_dict, buffers included)
    # and are exported from it like the weights.
    keys = [f"{m}.{a}" if m else a for m, _mod, a, _p in owned_params(skeleton)]  # tied weights once
    keys += [k for k, _b in persistent_buffers(skeleton)]
    shapes = {k: tuple(t.shape) for k, t in skeleton.state_dict().items()}
    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    stored_dtype = {k: meta[f"model.{k}"].properties.dtype for k in keys}
    sizes = {k: torch.Size(shapes[k]).numel() * torch.empty((), dtype=stored_dtype[k]).element_size() for k in keys}
    groups = save_groups(skeleton, keys)  # the file layout save_pretrained writes (MoE experts one by one)

    def saved_layout(tensors: dict) -> dict:
        return to_saved_layout(skeleton, tensors)

    def write(tmp: Path) -> None:
        writer = ShardWriter(tmp, max_shard_bytes)
        for batch in _batches(groups, sizes, max_shard_bytes):
            part = {k: torch.empty(shapes[k], dtype=stored_dtype[k]) for group in batch for k in group}
            try:
                with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                    warnings.simplefilter("ignore", UserWarning)
                    dcp.load({"model": part}, checkpoint_id=str(path), no_dist=True)
            except Exception as e:  # noqa: BLE001
                lines = str(e).strip().splitlines()
                raise UserError(f"{path}: cannot read the DCP shards ({type(e).__name__}: "
                                f"{lines[-1] if lines else ''})") from None
            for group in batch:
                for key, t in saved_layout({k: part[k] for k in group}).items():
                    writer.add(key, _cast(t, dtype))
            del part
        writer.finish()
        _write_meta(tmp, hf_config, tokenizer, dtype)

    out = Path(out_dir)
    replaced = _write_export(out, str(path.resolve()), dtype, check, write)
    return out, replaced


# ----------------------------------------------------------------------------- LoRA / freeze checkpoints


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def finetune_base(ident: dict, base: Optional[str], path: Path) -> Path:
    """The base model folder of a LoRA / freeze checkpoint: --base, else the model.path it was trained on."""
    folder = base or ident.get("base")
    if not folder:
        raise UserError(f"export: {path} was fine-tuned ({ident.get('method')}) from random weights; there is no "
                        "base model to export with: give --base DIR")
    if not (Path(folder) / "config.json").is_file():
        raise UserError(f"export: base model {folder} (the frozen weights of {path}) is not a Hugging Face folder "
                        "there; give its current location with --base DIR")
    return Path(folder)


def read_trained(path: Path) -> dict[str, torch.Tensor]:
    """Every model tensor a LoRA / freeze checkpoint holds (the trainable weights: small by design)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    part = {k[len("model."):]: torch.empty(tuple(v.size), dtype=v.properties.dtype)
            for k, v in meta.items() if k.startswith("model.") and hasattr(v, "size")}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": part}, checkpoint_id=str(path), no_dist=True)
    except Exception as e:  # noqa: BLE001
        lines = str(e).strip().splitlines()
        raise UserError(f"{path}: cannot read the DCP shards ({type(e).__name__}: {lines[-1] if lines else ''})") \
            from None
    return part


def lora_deltas(trained: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """'<module>.weight' -> scaling * B @ A (fp32) for every adapter pair."""
    out = {}
    for key in trained:
        if key.endswith(".lora_A.weight"):
            module = key[:-len(".lora_A.weight")]
            a, b = trained[key].float(), trained[f"{module}.lora_B.weight"].float()
            out[f"{module}.weight"] = scaling * (b @ a)
    return out


def write_adapter(tmp: Path, trained: dict[str, torch.Tensor], ident: dict, linear_names: list[str],
                  base: Path, dtype: torch.dtype, reward: bool = False) -> None:
    """A PEFT LoRA adapter folder: adapter_model.safetensors (PEFT's key names) and adapter_config.json.
    reward: a reward model's adapter (PEFT's SEQ_CLS task, the score head in modules_to_save)."""
    from safetensors.torch import save_file

    from ..model.finetune import peft_key, target_modules_for_peft

    lora_modules = sorted({k.rsplit(".lora_", 1)[0] for k in trained if ".lora_A." in k or ".lora_B." in k})
    save_file({peft_key(k): _cast(t, dtype).contiguous() for k, t in trained.items()}, str(tmp / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if reward else "CAUSAL_LM",
        "base_model_name_or_path": str(base.resolve()),
        "r": ident["rank"], "lora_alpha": ident["alpha"], "use_rslora": ident.get("use_rslora", False),
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "target_modules": target_modules_for_peft(linear_names, lora_modules, ident.get("targets", [])),
        "modules_to_save": ident.get("modules_to_save") or None, "init_lora_weights": True,
    }
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def write_merged(tmp: Path, base: Path, trained: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor],
                 dtype: torch.dtype, max_shard_bytes: int, reward: bool = False) -> None:
    """The base model's tensors, one at a time, with trained weights replacing theirs and LoRA deltas added.
    reward: the model is a reward model trained from a causal LM: its score head (trained, not in the base's
    files) is written and the base's lm_head, which the sequence-classification model lacks, is left out."""
    from ..model.models import REWARD_HEAD, safetensors_index
    from ..model.safetensors_io import DTYPES as STORED_DTYPES
    from ..model.safetensors_io import SafetensorsFile

    index = safetensors_index(str(base))
    full = {k: t for k, t in trained.items() if ".lora_A." not in k and ".lora_B." not in k}
    head = {k: t for k, t in full.items() if reward and k.split(".")[0] == REWARD_HEAD and k not in index}
    if reward:
        index = {k: f for k, f in index.items() if k.split(".")[0] != "lm_head"}
    missing = sorted(k for k in [*full, *deltas] if k not in index and k not in head)
    if missing:
        raise UserError(f"export: {base}: weight '{missing[0]}' is not in the base model's files under that name "
                        "(a model whose files are converted on load, e.g. fused MoE experts); export the adapter "
                        "without --merge")
    writer = ShardWriter(tmp, max_shard_bytes)
    handles: dict[Path, SafetensorsFile] = {}
    try:
        for key, f in index.items():
            if key in full:
                t = full[key]
            else:
                h = handles.get(f) or handles.setdefault(f, SafetensorsFile(f))
                stored = STORED_DTYPES.get(h.header[key].get("dtype"), torch.float32)
                t = torch.empty(h.shape(key), dtype=torch.float32 if stored.is_floating_point else stored)
                h.read_into(key, tuple(slice(0, n) for n in t.shape), t)
                if key in deltas:
                    t += deltas[key]
            writer.add(key, _cast(t, dtype))
        for key, t in head.items():
            writer.add(key, _cast(t, dtype))
    finally:
        for h in handles.values():
            h.close()
    writer.finish()


def export_finetuned(path: Path, saved: dict, out_dir: str, dtype_name: str, max_shard_bytes: int, check: dict,
                     merge: bool, base: Optional[str]) -> bool:
    """Export a LoRA checkpoint as a PEFT adapter (or, with merge, a full model), a freeze checkpoint as a full
    model; the frozen weights come from the base model folder. Returns whether an earlier export was replaced."""

    ident = saved["finetune"]
    base_dir = finetune_base(ident, base, path)
    raw_config, hf_config, tokenizer = checkpoint_model_files(path)
    dtype = export_dtype(dtype_name, saved.get("precision", "fp32"))
    trained = read_trained(path)
    lora = ident.get("method") == "lora"
    reward = is_reward_config(hf_config)

    def write(tmp: Path) -> None:
        if lora and not merge:
            skeleton = _skeleton(raw_config, hf_config)
            names: dict[int, list[str]] = {}
            for n, p in skeleton.named_parameters(remove_duplicate=False):
                names.setdefault(id(p), []).append(n)
            tied = [ns for ns in names.values() if len(ns) > 1 and any(n in trained for n in ns)]
            if tied:  # PEFT's modules_to_save copies one module: it cannot hold a trained tied weight
                raise UserError(f"export: {path} trained the tied weight {' = '.join(tied[0])} (modules_to_save); a "
                                "PEFT adapter cannot hold it: add --merge to export a full model")
            linear = [n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear)]
            write_adapter(tmp, trained, ident, linear, base_dir, dtype, reward)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            return
        scaling = ident["alpha"] / (ident["rank"] ** 0.5 if ident.get("use_rslora") else ident["rank"]) if lora else 0
        write_merged(tmp, base_dir, trained, lora_deltas(trained, scaling) if lora else {}, dtype, max_shard_bytes,
                     reward)
        _write_meta(tmp, hf_config, tokenizer, dtype)

    what = "a PEFT adapter" if lora and not merge else "a merged model"
    return _write_export(Path(out_dir), f"{path.resolve()} ({what})", dtype, check, write)
