"""Hugging Face model folders: from a live sharded model (end of training) or from a DCP checkpoint.

Both paths stream: weights go to disk one safetensors shard (at most
`max_shard_bytes`) at a time, so neither the exporting rank nor the `fsdptrain
export` process ever holds the whole model. The folder gets
model.safetensors (or model-0000i-of-0000n.safetensors + index), config.json,
generation_config.json and the tokenizer files; it is written under a
temporary name and renamed, so it appears complete or not at all. Tied
embeddings are written once (transformers re-ties lm_head on load).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .errors import UserError
from .models import owned_params

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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


def _begin(out: Path) -> Path:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _finish(tmp: Path, out: Path, hf_config: PretrainedConfig, tokenizer: Optional[PreTrainedTokenizerBase],
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
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)  # the folder appears complete or not at all


@torch.no_grad()
def export_hf(model: nn.Module, hf_config: PretrainedConfig, tokenizer: Optional[PreTrainedTokenizerBase],
              out_dir: str | Path, is_main: bool, dtype: torch.dtype = torch.float32,
              max_shard_bytes: int = 5 * 10**9) -> None:
    """Export a live (FSDP-sharded) model; a collective: every rank calls it, rank 0 writes."""
    out = Path(out_dir)
    writer = ShardWriter(_begin(out), max_shard_bytes) if is_main else None
    for mod_name, _mod, attr, p in owned_params(model):  # tied weights appear once
        full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
        if writer is not None:
            writer.add(f"{mod_name}.{attr}" if mod_name else attr, full.to(dtype=dtype, device="cpu"))
        del full
    if writer is None:
        return
    writer.finish()
    _finish(writer.folder, out, hf_config, tokenizer, dtype)


# ----------------------------------------------------------------------------- from a checkpoint


def _batches(keys: list[str], sizes: dict[str, int], limit: int) -> Iterator[list[str]]:
    batch, total = [], 0
    for k in keys:
        if batch and total + sizes[k] > limit:
            yield batch
            batch, total = [], 0
        batch.append(k)
        total += sizes[k]
    if batch:
        yield batch


@torch.no_grad()
def export_checkpoint(checkpoint: str, out_dir: str, dtype_name: str = "auto",
                      max_shard_bytes: int = 5 * 10**9) -> Path:
    """Write a Hugging Face folder from a checkpoint alone (one process, one shard in memory at a time)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from transformers import AutoConfig, AutoTokenizer

    from . import models
    from .checkpoint import check_model, resolve_resume, verify_files

    path = resolve_resume(str(Path(checkpoint)), Path(checkpoint), key="export")
    if path is None:
        raise UserError(f"export: {checkpoint}: give a checkpoint folder or a run directory")
    saved = verify_files(path)
    hf_dir = path / "hf"
    try:
        hf_config = AutoConfig.from_pretrained(str(hf_dir))
    except (OSError, ValueError) as e:
        raise UserError(f"{hf_dir}/config.json: cannot read the model config ({str(e).splitlines()[0]})") from None
    tokenizer = None
    if any((hf_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    dtype = export_dtype(dtype_name, saved.get("precision", "fp32"))

    skeleton = models.build_meta_model(hf_config, "sdpa", torch.float32, False)
    check_model(path, skeleton.state_dict(), saved)
    keys = [f"{m}.{a}" if m else a for m, _mod, a, _p in owned_params(skeleton)]  # tied weights once
    shapes = {k: tuple(t.shape) for k, t in skeleton.state_dict().items()}
    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    stored_dtype = {k: meta[f"model.{k}"].properties.dtype for k in keys}
    sizes = {k: torch.Size(shapes[k]).numel() * torch.empty((), dtype=stored_dtype[k]).element_size() for k in keys}
    del skeleton

    out = Path(out_dir)
    writer = ShardWriter(_begin(out), max_shard_bytes)
    for batch in _batches(keys, sizes, max_shard_bytes):
        part = {k: torch.empty(shapes[k], dtype=stored_dtype[k]) for k in batch}
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.simplefilter("ignore", UserWarning)
                dcp.load({"model": part}, checkpoint_id=str(path), no_dist=True)
        except Exception as e:  # noqa: BLE001
            lines = str(e).strip().splitlines()
            raise UserError(f"{path}: cannot read the DCP shards ({type(e).__name__}: "
                            f"{lines[-1] if lines else ''})") from None
        for k in batch:
            writer.add(k, part[k].to(dtype))
        del part
    writer.finish()
    _finish(writer.folder, out, hf_config, tokenizer, dtype)
    return out
