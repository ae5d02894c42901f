"""Hugging Face export of a sharded model, streamed so no rank holds the whole state dict.

Parameters are gathered one at a time (`DTensor.full_tensor()`, a collective
every rank joins); rank 0 collects them into safetensors shards of at most
`max_shard_bytes` and writes model.safetensors.index.json, config.json,
generation_config.json and the tokenizer files beside them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .models import _owned_params


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


@torch.no_grad()
def export_hf(model: nn.Module, hf_config, tokenizer, out_dir: str | Path, is_main: bool,
              dtype: torch.dtype = torch.float32, max_shard_bytes: int = 5 * 2**30) -> None:
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for mod_name, _mod, attr, p in _owned_params(model):
        key = f"{mod_name}.{attr}" if mod_name else attr
        full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
        if not is_main:
            continue
        t = full.to(dtype=dtype, device="cpu").contiguous()
        if sizes[-1] and sizes[-1] + t.numel() * t.element_size() > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][key] = t
        sizes[-1] += t.numel() * t.element_size()
    if not is_main:
        return
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        _save_shard(shard, tmp / name)
        weight_map.update({k: name for k in shard})
    if n > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg = hf_config.__class__.from_dict(hf_config.to_dict())
    cfg.dtype = dtype
    cfg.use_cache = True
    cfg.save_pretrained(str(tmp))
    try:
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(cfg).save_pretrained(str(tmp))
    except Exception:  # generation config is a convenience; never fail an export for it
        pass
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)  # the folder appears complete or not at all
