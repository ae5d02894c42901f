"""`fsdptrain eval`: the eval loss of a checkpoint, a run's newest checkpoint or a Hugging Face model folder.

The model is built and sharded as the config says (any number of ranks under
torchrun), the weights come from the checkpoint's DCP shards (model only) or
the Hugging Face folder, and the eval data is the config's (data.val_size or
data.eval_datasets), dealt and summed as during training (evaluate.py): the same
checkpoint gives the same eval loss in the run and here.

Every objective evaluates: sft (loss and perplexity per target token), dpo and rm (loss per held-out pair and the
reward accuracy; no perplexity). A dpo evaluation compares with the reference model the run compared with: the
config's preference.ref_model, else its model.path (the run's starting model), built as a frozen sharded copy
whatever the fine-tuning method (the source's own weights are the trained ones, so the policy with its adapters
off or its trainable shards as loaded is not the start when the source is an exported or merged folder). An rm
evaluation builds the family's sequence-classification model (its score head from the source).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from .config.schema import Config
from .core import log
from .core.errors import ConfigError, UserError
from .core.files import read_json, write_atomic
from .data import pipeline
from .data.tokenizer import load_tokenizer
from .dist import distributed
from .model import models
from .objectives.choose import needs_reference_model, objective_for
from .objectives.loss import install_chunked_loss
from .run.checkpoint import MARKER, SUBDIR, CheckpointError, resolve_resume, verify_files
from .train.build import build_reference, build_sharded_model, reference_config
from .train.evaluate import EvalResult, eval_micro_batch, evaluate

RESULT_KEY = "fsdptrain_eval"  # marks a result file this command wrote (the only kind it replaces)


def resolve_source(path: str) -> tuple[str, Path, Optional[Path]]:
    """(kind, Hugging Face folder with config and tokenizer, DCP checkpoint folder or None) of --checkpoint."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"--checkpoint: {path}: no such folder; give a checkpoint folder, a run directory or a "
                        "Hugging Face model folder")
    if (p / "config.json").is_file() and not (p / MARKER).is_file() and not (p / SUBDIR).is_dir():
        if not any(p.glob("*.safetensors")):
            raise UserError(f"--checkpoint: {path}: a Hugging Face config without *.safetensors weights; give a "
                            "folder with the model's weights")
        return "hf", p, None
    try:
        ckpt = resolve_resume(str(p), p, key="--checkpoint")
    except CheckpointError as e:
        raise UserError(f"{e}, or a Hugging Face model folder") from None
    assert ckpt is not None
    verify_files(ckpt)
    return "checkpoint", ckpt / "hf", ckpt


def load_dcp_model(model, ckpt: Path, partial: bool = False) -> None:
    """The model's weights from a checkpoint's DCP shards (the optimizer state is not read). partial: a LoRA /
    freeze checkpoint, which holds the trainable weights only (run/checkpoint.py Saved.state_dicts): those are
    read, the frozen ones stay as built (loaded from the base folder)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    options = StateDictOptions(ignore_frozen_params=partial, strict=not partial)
    msd = get_model_state_dict(model, options=options)
    if partial:  # a tied weight's second name survives ignore_frozen_params: the checkpoint has neither
        frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        msd = {k: v for k, v in msd.items() if k not in frozen}
    try:
        dcp.load({"model": msd}, checkpoint_id=str(ckpt))
    except Exception as e:  # noqa: BLE001  (DCP wraps per-rank failures; name the folder)
        lines = str(e).strip().splitlines()
        raise CheckpointError(f"{ckpt}: cannot read the model's DCP shards ({type(e).__name__}: "
                              f"{lines[-1] if lines else ''}); does the config describe this checkpoint's "
                              "model?") from None
    set_model_state_dict(model, msd, options=options)


def frozen_base(cfg: Config, ckpt: Optional[Path]) -> Optional[str]:
    """The folder a LoRA / freeze checkpoint's frozen weights load from (its DCP shards hold the trainable ones
    only): the config's model.path (the run's base; it may have moved since), else the base the checkpoint
    recorded. None for a full fine-tuning checkpoint or a Hugging Face folder (every weight in the source)."""
    if ckpt is None:
        return None
    ident = read_json(ckpt / "train_state.json").get("finetune") or {}
    if ident.get("method", "full") == "full":
        return None
    base = cfg.model.path if cfg.model.path is not None and not cfg.model.random_init else ident.get("base")
    if base is None:
        raise UserError(f"--checkpoint: {ckpt} is a {ident['method']} checkpoint (its trainable weights only) of a "
                        "run from random weights; its frozen weights are in no folder, so it cannot be evaluated")
    return str(base)


def check_out(out: Path) -> None:
    """--out may be a new file or an earlier result of this command, nothing else."""
    if out.exists():
        try:
            ours = out.is_file() and RESULT_KEY in json.loads(out.read_text())
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            raise UserError(f"--out: {out} exists and is not an fsdptrain eval result; give another file")


def write_result(out: Path, result: dict) -> None:
    """The JSON result, written to a temporary name and renamed; only an earlier result of ours is replaced."""
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(result, indent=1) + "\n")


def reference_start(cfg: Config) -> Optional[Config]:
    """For a dpo config with a reference model: the config whose preference.ref_model names the reference folder
    (the config's own ref_model, else its model.path: what the run started from); None for other objectives and
    the reference-free losses. Refused when there is no such folder (a run from random weights)."""
    if not needs_reference_model(cfg):
        return None
    folder = cfg.preference.ref_model or cfg.model.path
    if folder is None or (cfg.model.random_init and cfg.preference.ref_model is None):
        raise ConfigError("eval: train.objective dpo compares with the reference model, the run's starting model "
                          "(model.path) or preference.ref_model, and this config names no folder for it; set "
                          "preference.ref_model to the model the run started from")
    return dataclasses.replace(cfg, preference=dataclasses.replace(cfg.preference, ref_model=folder))


def eval_checkpoint(cfg: Config, source: str, out: Optional[str]) -> EvalResult:
    """Evaluate `source` on cfg's eval data; rank 0 prints the result and writes it to `out` (JSON)."""
    kind, hf_dir, ckpt = resolve_source(source)
    started = reference_start(cfg)  # the run's starting model: a dpo evaluation's reference
    base = frozen_base(cfg, ckpt)  # a LoRA / freeze checkpoint: its frozen weights' folder
    out_path = Path(out) if out else Path(f"eval-{(ckpt or hf_dir).name}.json")
    check_out(out_path)  # before any work
    # the weights come from the source: model.path is its folder (random init stands in until DCP fills it)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(hf_dir), hf_config=None,
                                                             random_init=ckpt is not None))
    info = distributed.init(cfg.parallel.device, cfg.parallel.timeout_minutes)
    try:
        with log.held():  # a mistake in the data or the model's config is the only line printed
            tokenizer = load_tokenizer(cfg.model.tokenizer, str(hf_dir), cfg.model.trust_remote_code)
            _, evals = pipeline.load_train_eval(cfg, tokenizer, info.rank, info.local_rank, log.info)
            if evals is None:
                raise UserError("eval: the config has no eval data; set data.val_size (as in training) or "
                                "data.eval_datasets")
            hf_config = models.load_hf_config(str(hf_dir), None, len(tokenizer), cfg.model.trust_remote_code)
            if cfg.train.objective == "rm":  # as training built it (trainer.setup_hf_config)
                hf_config = models.as_reward_config(hf_config, tokenizer.pad_token_id)
            ref_config = reference_config(started, hf_config) if started is not None else None
        sharded = build_sharded_model(cfg, info, hf_config, weights=base)
        model = sharded.model
        if ckpt is not None:
            load_dcp_model(model, ckpt, partial=base is not None)
        reference = None
        if started is not None:  # after the policy: both on the same mesh
            reference = build_reference(started, info, hf_config, sharded, ref_config)
        head = install_chunked_loss(model, cfg.train.loss_chunk_tokens,
                                    cfg.parallel.compile_backend if cfg.parallel.compile else None)
        res = evaluate(model, objective_for(cfg, reference), evals, tokenizer.pad_token_id, info.device,
                       info.world_size, info.rank, eval_micro_batch(cfg), cfg.train.eval_max_batches, head,
                       cfg.data.packing and cfg.model.attn_implementation == "flash_attention_2")
        step = read_json(ckpt / "train_state.json").get("step") if ckpt is not None else None
        if info.is_main:
            write_result(out_path, {RESULT_KEY: 1, "source": str(source), "kind": kind,
                                    "checkpoint": str(ckpt or hf_dir), "step": step, **res.metrics(),
                                    "examples": res.examples, "world_size": info.world_size})
            log.info(f"eval {ckpt or hf_dir}: {res.summary()} ({res.examples} rows, {res.seconds:.1f}s); result "
                     f"in {out_path}")
        distributed.barrier()
        return res
    finally:
        distributed.shutdown(info)
