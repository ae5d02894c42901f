"""A model folder's config.json, read and checked before transformers sees it.

transformers meets a config.json it cannot use with a warning of its own (printed while the tokenizer loads,
long before the model) and then a three-sentence ValueError. Reading the file here first turns the usual
mistakes into one line naming the file: not JSON, not an object, quantized weights, and an unknown
`model_type` (with the closest types this transformers knows, a typo being the usual cause).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Optional

from ..core.errors import UserError
from ..core.files import FileError, read_json


def known_model_types() -> list[str]:
    """Every `model_type` this transformers has a config class for."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return list(CONFIG_MAPPING_NAMES)


def unknown_model_type(model_type: str) -> Optional[str]:
    """None when transformers knows `model_type`, else what to say: the type and the closest known ones."""
    known = known_model_types()
    if model_type in known:
        return None
    from importlib.metadata import version

    close = difflib.get_close_matches(model_type, known, n=3, cutoff=0.6)
    nearest = f"closest known: {', '.join(repr(t) for t in close)}; " if close else ""
    return f"unknown model_type '{model_type}' ({nearest}transformers {version('transformers')} knows {len(known)})"


def check_model_type(config_file: Path, raw: dict[str, Any]) -> None:
    """One line when config.json's `model_type` is one transformers does not know and no remote code defines it
    (`auto_map`, model.trust_remote_code)."""
    model_type = raw.get("model_type")
    auto_map = raw.get("auto_map")
    if not isinstance(model_type, str) or (isinstance(auto_map, dict) and "AutoConfig" in auto_map):
        return  # no type (transformers guesses from the folder name) or the folder's own code: transformers decides
    unknown = unknown_model_type(model_type)
    if unknown:
        raise UserError(f"{config_file}: {unknown}; fix model_type in that file, or upgrade transformers if the "
                        "model is newer than it")


def check_folder_model_type(folder: Path) -> None:
    """The model_type of `folder`/config.json (a tokenizer folder that is also a model's), before AutoTokenizer
    reads it and warns about an unknown type in transformers' words."""
    config_file = folder / "config.json"
    raw = read_json(config_file, "a Hugging Face model config")
    if isinstance(raw, dict):
        check_model_type(config_file, raw)


def read_config_json(folder: Path) -> dict[str, Any]:
    """`folder`/config.json as a dict, refused in one line when it is missing, not a JSON object, describes
    quantized weights or names an unknown model_type."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"model.path: {folder}: no config.json there; point it at a local Hugging Face model folder")
    raw = read_json(config_file, "a Hugging Face model config")  # not UTF-8, not JSON: one line, with the line
    if not isinstance(raw, dict):
        raise FileError(f"{config_file}: expected a JSON object (a Hugging Face model config), got "
                        f"{type(raw).__name__}; point model.path at a Hugging Face model folder")
    quant = raw.get("quantization_config")
    if quant is not None:  # GPTQ, AWQ, bitsandbytes, fp8, mxfp4 (gpt-oss), ...: not weights fsdptrain can train
        method = quant.get("quant_method", "unnamed") if isinstance(quant, dict) else "unnamed"
        raise UserError(f"model.path: {config_file}: quantization_config ({method}): the weights are quantized, "
                        "and fsdptrain loads and trains full-precision (bf16/fp32) weights; point model.path at "
                        "the unquantized model (QLoRA is not supported)")
    check_model_type(config_file, raw)
    return raw
