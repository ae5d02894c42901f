"""Training checkpoints: sharded save, crash-safe publication, validation and exact resume.

A checkpoint is a folder `output_dir/checkpoints/step-XXXXXXXX/` holding
  - the DCP (`torch.distributed.checkpoint`) files of model + optimizer
    (`.metadata`, `__<rank>_0.distcp`): every rank writes its own shards, and
    any world size can load them (DCP reshards on load);
  - `train_state.json`: step, tokens seen, LR scheduler, data sampler identity,
    world size, batch shape;
  - `rng/rank-XXXXX.json`: each rank's torch / CUDA / python / numpy RNG state
    (JSON, no pickle);
  - `hf/`: the Hugging Face config and tokenizer, so `fsdptrain export` needs
    nothing but the checkpoint;
  - `COMPLETE.json`, written last: the size of every file above.
Everything is written into `step-XXXXXXXX.tmp/`, the marker goes in last and
the folder is then renamed: a folder without `.tmp` and with a marker is
complete. The next run removes only what this trainer leaves when it is
interrupted (`step-N.tmp`: a save, `step-N.deleting`: a prune); anything
else under checkpoints/ that is not a complete `step-N` checkpoint (a copy
named `best`, a folder whose marker was removed) is left alone and named in
the log, and keep_last prunes only complete `step-N` folders. Loading first checks every
file against the marker's sizes and the weights against the model, so a
truncated or foreign checkpoint fails with one line naming the file; under resume: auto a damaged newest
checkpoint is renamed `step-N.damaged` and the one before it is loaded.

The output directory must be on a file system all nodes share.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..config.schema import CheckpointConfig
from ..core import log
from ..core.errors import UserError
from ..core.files import FileError, read_json, reading
from ..core.units import format_bytes
from ..dist.distributed import barrier
from .best import BEST_FILE, read_best, update_best

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

MARKER = "COMPLETE.json"
STATE_FILE = "train_state.json"
FORMAT = 1
SUBDIR = "checkpoints"


class CheckpointError(UserError):
    """A checkpoint that cannot be used (incomplete, truncated, another model, unmappable)."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files are not what its marker says (missing, truncated, unreadable JSON or DCP shards),
    as opposed to a sound checkpoint that does not fit this run (another model, an unmappable world size)."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    tokens_seen: int = 0  # input tokens consumed over all ranks


# ----------------------------------------------------------------------------- finding checkpoints


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def _step_of(path: Path) -> Optional[int]:
    name = path.name
    if not name.startswith("step-") or not name[5:].isdigit():
        return None
    return int(name[5:])


def is_complete(path: Path) -> bool:
    return _step_of(path) is not None and (path / MARKER).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root` (a checkpoints/ folder), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: _step_of(p))


def is_own_leftover(path: Path) -> bool:
    """A folder only this trainer makes, left by an interruption: `step-N.tmp` (a save), `step-N.deleting` (a
    prune). Nothing else under checkpoints/ is ever deleted at start-up."""
    stem, dot, suffix = path.name.rpartition(".")
    return (bool(dot) and suffix in ("tmp", "deleting") and _step_of(Path(stem)) is not None
            and path.is_dir() and not path.is_symlink())


def clean_incomplete(root: Path) -> tuple[list[str], list[str]]:
    """Delete what an interrupted save or prune left under checkpoints/ (`step-N.tmp`, `step-N.deleting`).

    Everything else that is not a complete `step-N` checkpoint (an unmarked step folder, a copy named `best`, a
    file) is left alone. Returns (removed names, left-alone names).
    """
    removed: list[str] = []
    left: list[str] = []
    if not root.is_dir():
        return removed, left
    for p in sorted(root.iterdir()):
        if is_own_leftover(p):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
        elif not (p.is_dir() and is_complete(p)) and p.name != BEST_FILE:
            left.append(p.name)
    return removed, left


def resolve_resume(resume: str, output_dir: Path, key: str = "checkpoint.resume") -> Optional[Path]:
    """checkpoint.resume -> the folder to load, or None to start fresh."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir / SUBDIR)
        return found[-1] if found else None
    path = Path(resume)
    if is_complete(path):
        return path
    if (path / MARKER).is_file():  # a complete checkpoint under another name (copied by hand)
        return path
    if path.is_dir():
        found = complete_checkpoints(path / SUBDIR) or complete_checkpoints(path)
        if found:
            return found[-1]
        if (path / ".metadata").is_file() or path.name.endswith(".tmp"):
            raise CheckpointError(f"{key}: {path}: incomplete checkpoint (no {MARKER}; the save was "
                                  "interrupted); resume from an earlier one or use checkpoint.resume=auto")
        raise CheckpointError(f"{key}: {path}: no complete checkpoint there (expected a step-N folder "
                              f"with {MARKER}, or a run directory with {SUBDIR}/)")
    raise CheckpointError(f"{key}: {path}: no such folder; give a checkpoint folder, auto or none")


DAMAGED = "the checkpoint is damaged or was edited by hand: restore the file or resume from another checkpoint"

# What train_state.json's keys hold (a value of the same JSON type; None: anything). A checkpoint from an older
# fsdptrain may lack some; the keys a reader needs are required where it reads them.
STATE_FORM = {"format": FORMAT, "step": 0, "tokens_seen": 0, "world_size": 1, "model_type": None, "precision": "",
              "scheduler": {}, "sampler": {}}


def _fits(value: Any, form: Any) -> bool:
    """`value` (read from JSON) has the JSON type of `form`; an integer fits where a float is expected."""
    if form is None:
        return True
    if isinstance(form, bool) or isinstance(value, bool):
        return isinstance(form, bool) and isinstance(value, bool)
    if isinstance(form, int):
        return isinstance(value, int)
    if isinstance(form, float):
        return isinstance(value, (int, float))
    if isinstance(form, (list, tuple)):
        return isinstance(value, list) and len(value) == len(form) and all(map(_fits, value, form))
    return isinstance(value, type(form))


def _form_text(form: Any) -> str:
    if isinstance(form, bool):
        return "true or false"
    if isinstance(form, (list, tuple)):
        return f"a list of {len(form)} value(s) like {json.dumps(list(form))}"
    names = {int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    return names.get(type(form), type(form).__name__)


def check_keys(file: Path, data: Any, form: dict[str, Any], required: tuple[str, ...] = (), prefix: str = "") -> None:
    """One line naming `file` and the key when the JSON object `data` lacks a required key or holds a value of
    another type than `form` has for that key."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: {f'key {prefix[:-1]!r}: ' if prefix else ''}expected a JSON object, got "
                              f"{json.dumps(data)[:40]}; {DAMAGED}")
    for key in required:
        if key not in data:
            raise CheckpointError(f"{file}: key '{prefix}{key}' is missing; {DAMAGED}")
    for key, value in data.items():
        if key in form and not _fits(value, form[key]):
            raise CheckpointError(f"{file}: key '{prefix}{key}': expected {_form_text(form[key])}, got "
                                  f"{json.dumps(value)[:40]}; {DAMAGED}")


def verify_files(path: Path, required: tuple[str, ...] = ("step",)) -> dict:
    """Check every file listed by the marker exists with its recorded size; returns train_state.json (its keys'
    types checked, the `required` ones present: a resume needs more of them than an export)."""
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MARKER})")
    manifest = read_json(marker, "a checkpoint marker", fix=DAMAGED)  # damaged JSON: one line naming the file
    check_keys(marker, manifest, {"step": 0, "files": {}}, required=("files",))
    files: dict[str, int] = manifest["files"]
    check_keys(marker, files, dict.fromkeys(files, 0), prefix="files.")
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from the checkpoint (listed in {MARKER}); the checkpoint is damaged, "
                                  "resume from another one")
        actual = f.stat().st_size
        if actual != size:
            raise CheckpointError(f"{f}: truncated or altered ({actual} bytes, {MARKER} records {size}); "
                                  "the checkpoint is damaged, resume from another one")
    state = read_json(path / STATE_FILE, "a checkpoint's train state", fix=DAMAGED)
    check_keys(path / STATE_FILE, state, STATE_FORM, required=required)
    if state["step"] < 0:
        raise CheckpointError(f"{path / STATE_FILE}: key 'step': {state['step']} is below 0; {DAMAGED}")
    return state


# ----------------------------------------------------------------------------- RNG (JSON, no pickle)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    state: dict[str, Any] = {"torch": _b64(torch.get_rng_state())}
    version, internal, gauss = random.getstate()
    state["python"] = {"version": version, "state": list(internal), "gauss": gauss}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                          "cached": float(cached)}
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "numpy" in state:
        import numpy as np

        n = state["numpy"]
        np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


# ----------------------------------------------------------------------------- compatibility checks


def check_model(path: Path, model_sd: dict[str, torch.Tensor], saved: dict) -> None:
    """Every weight of the model is in the checkpoint with the same shape, and nothing else is."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    stored = {k[len("model."):]: v for k, v in meta.items() if k.startswith("model.")}
    origin = f" (it was saved from a {saved.get('model_type', '?')} model)"
    for key, t in model_sd.items():
        if key not in stored:
            raise CheckpointError(f"{path / '.metadata'}: checkpoint has no weight '{key}'{origin}; "
                                  "it is from another model, use a checkpoint of this model")
        size = getattr(stored[key], "size", None)
        if size is not None and tuple(size) != tuple(t.shape):
            raise CheckpointError(f"{path / '.metadata'}: weight '{key}' has shape {list(size)} in the checkpoint, "
                                  f"this model's is {list(t.shape)}{origin}; use a checkpoint of this model")
    extra = sorted(set(stored) - set(model_sd))
    if extra:
        raise CheckpointError(f"{path / '.metadata'}: checkpoint weight '{extra[0]}' (and {len(extra) - 1} more) "
                              f"does not exist in this model{origin}; use a checkpoint of this model")


def check_sampler(path: Path, saved: dict, current: dict, world_size: int, micro: int, accum: int) -> None:
    """The data order after resume must continue the saved one: same examples, seed and global batch."""
    for key in ("n_examples", "seed", "shuffle", "drop_last"):
        if key in saved and key in current and saved[key] != current[key]:
            raise CheckpointError(f"{path / STATE_FILE}: data sampler {key} is {saved[key]!r} in the checkpoint but "
                                  f"{current[key]!r} now; resume with the same data and seed")
    if "global_batch" in saved and saved["global_batch"] != current.get("global_batch"):
        b = saved.get("batch", {})
        raise CheckpointError(
            f"{path / STATE_FILE}: the sampler state (global batch {saved['global_batch']} = "
            f"{b.get('world_size')} ranks x micro {b.get('micro_batch_size')} x accum {b.get('grad_accum_steps')}) "
            f"cannot map onto {world_size} ranks x micro {micro} x accum {accum} = {current.get('global_batch')}; "
            f"choose train.micro_batch_size and train.grad_accum_steps so that ranks x micro x accum = "
            f"{saved['global_batch']}")


def check_finetune(path: Path, saved: Optional[dict], current: Optional[dict]) -> None:
    """A LoRA / freeze checkpoint resumes only into the same adapters and trainable weights (the base path may
    move)."""
    def form(ident: Optional[dict]) -> dict:
        ident = dict(ident or {"method": "full"})
        ident.pop("base", None)
        return ident

    a, b = form(saved), form(current)
    if a == b:
        return
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    def text(v: Any) -> str:
        return f"{len(v)} names" if isinstance(v, list) and len(v) > 6 else repr(v)

    shown = ", ".join(f"{k} {text(a.get(k))} in the checkpoint, {text(b.get(k))} now" for k in diff[:2])
    raise CheckpointError(f"{path / STATE_FILE}: finetune settings differ ({shown}); resume with the checkpoint's "
                          "finetune settings")


# ----------------------------------------------------------------------------- the checkpointer


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class Saved:
    """What a checkpoint holds and a resume restores; the Checkpointer is built once with it."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # torch LR scheduler (state_dict / load_state_dict)
    sampler: Any  # data.loader.StepSampler (its position advances as it hands out batches)
    hf_config: PretrainedConfig
    tokenizer: Optional[PreTrainedTokenizerBase]
    micro_batch_size: int
    grad_accum_steps: int
    # finetune.FinetunePlan.identity(): with lora or freeze only the trainable weights (and their optimizer
    # state) are saved; the frozen base stays in model.path. None: full fine-tuning.
    finetune: Optional[dict] = None

    @property
    def options(self) -> StateDictOptions:
        partial = self.finetune is not None and self.finetune.get("method") != "full"
        return StateDictOptions(ignore_frozen_params=partial, strict=not partial)

    def state_dicts(self) -> tuple[dict, dict]:
        """The model and optimizer state dicts a checkpoint holds: without the frozen weights under lora / freeze
        (DCP's ignore_frozen_params keeps a tied weight's second name, e.g. lm_head.weight: dropped here)."""
        msd, osd = get_state_dict(self.model, self.optimizer, options=self.options)
        if self.options.ignore_frozen_params:
            frozen = {n for n, p in self.model.named_parameters(remove_duplicate=False) if not p.requires_grad}
            msd = {k: v for k, v in msd.items() if k not in frozen}
        return msd, osd


class Checkpointer:
    """Saves and restores one run's checkpoints; every rank holds one and calls it at the same points.

    Built once with what it saves (`Saved`) and the run's TrainState, which it fills on `resume()` and
    reads on every save: the trainer only advances the state and calls `maybe_save(step, last=...)`.
    """

    def __init__(self, ccfg: CheckpointConfig, output_dir: Path, rank: int, world_size: int, precision: str,
                 saved: Saved, state: TrainState):
        self.cfg = ccfg
        self.precision = precision
        self.root = Path(output_dir) / SUBDIR
        self.rank = rank
        self.world_size = world_size
        self.saved = saved
        self.state = state
        self.last_saved_step = -1
        self.pending: Optional[tuple[Future, Path, Path, int]] = None
        self.async_group = None
        self.async_ok = ccfg.async_save
        self.evals: dict[int, float] = {}  # eval loss after each evaluated step (checkpoint.keep_best)
        if self.async_ok:
            # DCP's background thread runs its own collectives; a separate gloo group keeps them
            # from interleaving with the training loop's (and gives the CPU backend async_save needs).
            self.async_group = dist.new_group(backend="gloo")

    # -- resume -----------------------------------------------------------------------------

    def resume(self, total_steps: int) -> TrainState:
        """Load the checkpoint checkpoint.resume points at (if any) into the run; returns the (filled) state."""
        if self.rank == 0:
            removed, left = clean_incomplete(self.root)
            if removed:
                log.info(f"checkpoint: removed incomplete checkpoint folder(s) left by a crash: {', '.join(removed)}")
            if left:
                log.info(f"checkpoint: left alone under {SUBDIR}/ (not written by this trainer or not complete): "
                         f"{', '.join(left)}")
        barrier()
        path = resolve_resume(self.cfg.resume, self.root.parent)
        if path is None:
            if self.cfg.resume == "auto":
                log.info("checkpoint: no complete checkpoint to resume from; starting at step 0")
            return self.state
        path, saved = self._resume_from(path)
        self.state.step, self.state.tokens_seen = int(saved["step"]), int(saved.get("tokens_seen", 0))
        self.last_saved_step = self.state.step
        log.info(f"checkpoint: resumed from {path} at step {self.state.step} ({self.state.tokens_seen} tokens seen)")
        if self.state.step >= total_steps:
            log.info(f"checkpoint: the run is already complete ({self.state.step} of {total_steps} steps); nothing "
                     "to train. Raise train.max_steps to continue, or set checkpoint.resume=none or another "
                     "output_dir to start over")
        return self.state

    def _resume_from(self, path: Path) -> tuple[Path, dict]:
        """Load `path` into the run: (the checkpoint loaded, its train_state.json). Under `resume: auto` a damaged
        checkpoint (its files not what its marker says: a disk fault, a crash past the marker) is moved aside as
        `step-N.damaged` (renamed, nothing deleted) and the newest complete one before it is loaded instead, with
        one line saying so; a checkpoint that is sound but does not fit the run stops it, as does damage when the
        checkpoint was named. Every rank reads the same files and DCP raises a failed read on every rank, so all
        ranks take the same path."""
        while True:
            msd, osd = self.saved.state_dicts()  # afresh: a failed read may have filled some of them
            try:
                saved = self._check(path, msd)
                self._load(path, saved, msd, osd)
                return path, saved
            except DamagedCheckpoint as e:
                step = _step_of(path)
                older = [p for p in complete_checkpoints(self.root) if step is not None and _step_of(p) < step]
                if self.cfg.resume != "auto" or not older:
                    raise
                barrier()  # every rank is done with `path` before rank 0 moves it
                aside = path.with_name(path.name + ".damaged")
                if self.rank == 0:
                    aside = _set_aside(path)
                barrier()
                log.info(f"checkpoint: {path.name} is damaged ({str(e).split('; ')[0]}); moved it to {aside.name} "
                         f"and resuming from {older[-1].name}, the newest complete checkpoint before it")
                path = older[-1]

    def _check(self, path: Path, model_sd: dict) -> dict:
        """train_state.json of `path` once the files, the data order and the weights are known to fit."""
        try:
            saved = verify_files(path, required=("step", "format", "scheduler"))
        except (CheckpointError, FileError) as e:  # missing, truncated, unreadable: the files, not the run
            raise DamagedCheckpoint(str(e)) from None
        state_file = path / STATE_FILE
        if saved.get("format") != FORMAT:
            raise CheckpointError(f"{path / STATE_FILE}: checkpoint format {saved.get('format')!r}, "
                                  f"this fsdptrain reads {FORMAT}")
        s = self.saved
        # a scheduler takes any values and fails steps later: check them against this run's own scheduler
        check_keys(state_file, saved["scheduler"], s.scheduler.state_dict(), required=("last_epoch",),
                   prefix="scheduler.")
        try:
            with reading(state_file, "a checkpoint's train state", fix=DAMAGED):  # a sampler entry of another type
                check_sampler(path, saved.get("sampler", {}), sampler_identity(s.sampler), self.world_size,
                              s.micro_batch_size, s.grad_accum_steps)
                check_finetune(path, saved.get("finetune"), s.finetune)
            check_model(path, model_sd, saved)
        except CheckpointError as e:
            how = ("checkpoint.resume=none or another output_dir" if self.cfg.resume == "auto"
                   else "checkpoint.resume=none")
            raise CheckpointError(f"{e} ({how} starts fresh)") from None
        return saved

    def _load(self, path: Path, saved: dict, msd: dict, osd: dict) -> None:
        s = self.saved
        state = {"model": msd, "optim": osd}
        try:
            dcp.load(state, checkpoint_id=str(path))
        except Exception as e:  # noqa: BLE001  (DCP wraps per-rank failures; name the folder)
            first = str(e).strip().splitlines()
            raise DamagedCheckpoint(f"{path}: cannot read the DCP shards ({type(e).__name__}: "
                                  f"{first[-1] if first else ''})") from None
        set_state_dict(s.model, s.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=s.options)
        with reading(path / STATE_FILE, "a checkpoint's train state", fix=DAMAGED):  # values that do not fit
            s.scheduler.load_state_dict(saved["scheduler"])
            if hasattr(s.sampler, "load_state_dict"):
                s.sampler.load_state_dict(saved.get("sampler", {}))
        rng_file = path / "rng" / f"rank-{self.rank:05d}.json"
        if rng_file.is_file() and saved.get("world_size") == self.world_size:
            with reading(rng_file, "a checkpoint's random states", fix=DAMAGED):
                set_rng_state(read_json(rng_file, "a checkpoint's random states", fix=DAMAGED))
        else:
            log.info(f"checkpoint: saved on {saved.get('world_size')} ranks, resuming on {self.world_size}: "
                     "random states re-seeded instead of restored")

    # -- save ---------------------------------------------------------------------------------

    def maybe_save(self, step: int, last: bool = False, force: bool = False) -> bool:
        """Save after optimizer step `step` when it is due: every checkpoint.save_every steps, at the last step
        with checkpoint.save_at_end, and always when `force`d (a stop request). Collective: every rank calls
        it at the same steps."""
        due = step != self.last_saved_step and (
            force or (self.cfg.save_every and step % self.cfg.save_every == 0) or (last and self.cfg.save_at_end))
        if due:
            self.save(step)
        return bool(due)

    def save(self, step: int) -> None:
        """Write the run as of optimizer step `step` (collective: every rank calls it). A failed write (a full
        disk, a quota, a lost mount) is one line; the earlier checkpoints are untouched."""
        self.wait()  # one save in flight at most
        tmp = self.root / (step_name(step) + ".tmp")
        with _writing(step, tmp, self.rank):
            self._save(step, tmp)

    def _save(self, step: int, tmp: Path) -> None:
        final = self.root / step_name(step)
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        barrier()
        t0 = time.perf_counter()
        _write_json(tmp / "rng" / f"rank-{self.rank:05d}.json", rng_state())
        if self.rank == 0:
            self._write_run_files(tmp, step)
        msd, osd = self.saved.state_dicts()
        if self.async_ok:
            fut = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=str(tmp), process_group=self.async_group)
            self.pending = (fut, tmp, final, step)
            log.info(f"checkpoint: step {step} copied to CPU memory in {time.perf_counter() - t0:.2f}s; "
                     "writing it in the background")
        else:
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
            self._publish(tmp, final, step, t0)
        self.last_saved_step = step

    def _write_run_files(self, tmp: Path, step: int) -> None:
        """train_state.json and hf/ (rank 0)."""
        s = self.saved
        ident = sampler_identity(s.sampler)
        ident["batch"] = {"world_size": self.world_size, "micro_batch_size": s.micro_batch_size,
                          "grad_accum_steps": s.grad_accum_steps}
        _write_json(tmp / STATE_FILE, {
            "format": FORMAT, "step": step, "tokens_seen": self.state.tokens_seen, "world_size": self.world_size,
            "model_type": getattr(s.hf_config, "model_type", None), "precision": self.precision,
            "scheduler": _jsonable(s.scheduler.state_dict()),
            "sampler": ident,
            **({"finetune": s.finetune} if s.finetune is not None else {}),
        })
        hf_dir = tmp / "hf"
        s.hf_config.save_pretrained(str(hf_dir))
        if s.tokenizer is not None:
            s.tokenizer.save_pretrained(str(hf_dir))

    def wait(self) -> None:
        """Finish an asynchronous save: DCP's own final gather means rank 0 sees every rank's files."""
        if self.pending is None:
            return
        fut, tmp, final, step = self.pending
        self.pending = None
        t0 = time.perf_counter()
        with _writing(step, tmp, self.rank):
            fut.result()
            self._publish(tmp, final, step, t0)

    def _publish(self, tmp: Path, final: Path, step: int, t0: float) -> None:
        # DCP's save ends with a gather to rank 0 after every rank wrote its data, and each rank's
        # rng file was written before it entered DCP: rank 0 can seal the folder without a barrier.
        if self.rank == 0:
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            _write_json(tmp / MARKER, {"step": step, "files": files})
            _fsync_dir(tmp)
            kept = _make_room(final)
            if kept is not None:
                log.info(f"checkpoint: {final} was there and is not a complete checkpoint (no {MARKER}); moved it "
                         f"to {kept.name}, untouched, to save step {step}")
            os.replace(tmp, final)
            _fsync_dir(self.root)
            log.info(f"checkpoint: saved {final} in {time.perf_counter() - t0:.2f}s")
            if self.cfg.keep_best and step in self.evals and update_best(self.root, step, self.evals[step],
                                                                          final.name):
                log.info(f"checkpoint: {final.name} is the best so far (eval loss {self.evals[step]:.4f})")
            self._prune()
        if self.async_ok:
            return  # the other ranks may be mid-step; they never read the folder
        barrier()

    def note_eval(self, step: int, loss: float) -> None:
        """The eval loss after optimizer step `step`: a checkpoint of that step is ranked by it (keep_best)."""
        self.evals[step] = loss

    def _prune(self) -> None:
        keep = self.cfg.keep_last
        if keep <= 0:
            return
        best = read_best(self.root) if self.cfg.keep_best else None
        for old in complete_checkpoints(self.root)[:-keep]:  # complete step-N folders only, never `best` & co.
            if best is not None and old.name == best.get("checkpoint"):
                continue  # checkpoint.keep_best: the lowest eval loss stays
            if not old.is_symlink():
                _remove(old)

    def close(self) -> None:
        self.wait()
        barrier()


_IO_FAILURES = ("No space left on device", "Disk quota exceeded", "Read-only file system", "Permission denied",
                "Stale file handle", "Input/output error", "file write failed")
# How torch.save's zip writer (the one DCP's FileSystemWriter uses) reports a write that stopped short, e.g. on a
# full disk: `RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598`.
_ZIP_WRITER = ("inline_container", "PytorchStreamWriter")
_ENFORCE = re.compile(r"^\[enforce fail at [^\]]*\]\s*\.?\s*")


def write_failure(exc: BaseException) -> Optional[str]:
    """Why a checkpoint write failed, in a few words, or None when `exc` is no failed write (a lost peer, a bug).
    DCP gathers every rank's failure into one CheckpointException that every rank raises: a write that failed on
    any rank is named on all of them."""
    if isinstance(exc, CheckpointException):
        found = [write_failure(e) for e, _trace in exc.failures.values()]
        return next((r for r in found if r), None)
    text = str(exc)
    if isinstance(exc, ConnectionError):
        return None  # a peer, not the file system
    reason = next((r for r in _IO_FAILURES if r in text), None)
    if reason is None and isinstance(exc, OSError):
        reason = exc.strerror or type(exc).__name__
    if reason is None and isinstance(exc, RuntimeError) and any(w in text for w in _ZIP_WRITER):
        first = text.strip().splitlines()[0] if text.strip() else ""
        reason = f"the file writer stopped short: {_ENFORCE.sub('', first)}"
    return reason


def free_space(folder: Path) -> str:
    """'; N free there' for the file system of `folder`, or '' when it cannot be asked (a lost mount)."""
    try:
        return f"; {format_bytes(shutil.disk_usage(folder).free)} free there"
    except OSError:
        return ""


@contextmanager
def _writing(step: int, tmp: Path, rank: int) -> Iterator[None]:
    """A save that fails on I/O (a full disk, a quota, a lost mount, torch's writer stopping short) becomes one
    line, with the free space left, on every rank, and its temporary folder is removed (rank 0). Other failures (a
    peer lost mid-save, a bug) pass through unchanged."""
    try:
        yield
    except (OSError, RuntimeError, CheckpointException) as e:
        reason = write_failure(e)
        if reason is None and isinstance(e, CheckpointException):  # a BaseException: the CLI's last resort (and
            exc = next(iter(e.failures.values()))[0]  # the peer-loss check) would miss it
            raise RuntimeError(f"checkpoint step {step}: {type(exc).__name__}: {exc}") from e
        if reason is None:
            raise
        free = free_space(tmp.parent)  # what the write met, before its own folder is removed
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"checkpoint: could not write step {step} into {tmp.parent} ({reason}"
                              f"{free}); the earlier checkpoints there are intact: free space (or "
                              "fix the folder) and rerun the same command to continue from the newest one") from None


def _set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint `step-N` to `step-N.damaged` (`.damaged-2`, ... when taken): out of resume's way,
    kept for the user to inspect or delete; start-up names it among what it leaves alone."""
    aside, n = path.with_name(path.name + ".damaged"), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.damaged-{n}")
    path.rename(aside)
    _fsync_dir(path.parent)
    return aside


def _remove(path: Path) -> None:
    """Delete a complete step-N checkpoint of this trainer: renamed to step-N.deleting first (one atomic step), so a
    crash half-way never leaves something that looks complete, and the next start finishes the deletion."""
    trash = path.with_name(path.name + ".deleting")
    if trash.is_dir() and is_own_leftover(trash):  # an earlier prune of the same step was interrupted
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _make_room(final: Path) -> Optional[Path]:
    """Before publishing step-N: a complete step-N of an earlier attempt is replaced (deleted); anything else there
    (a folder whose marker was removed by hand, a link) is moved to step-N.kept-K untouched. Returns that name."""
    if not (final.exists() or final.is_symlink()):
        return None
    if is_complete(final) and final.is_dir() and not final.is_symlink():
        _remove(final)
        return None
    k = 1
    while (kept := final.with_name(f"{final.name}.kept-{k}")).exists() or kept.is_symlink():
        k += 1
    os.rename(final, kept)
    return kept


def _jsonable(obj: Any) -> Any:
    """Scheduler state: numbers and lists; callables (the LambdaLR function) are rebuilt from the config."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return None


def sampler_identity(sampler) -> dict:
    """What the data position depends on, plus the sampler's own state_dict() when it has one."""
    own = dict(sampler.state_dict()) if hasattr(sampler, "state_dict") else {}
    return {**own, "n_examples": sampler.n_examples, "seed": sampler.seed, "shuffle": sampler.shuffle,
            "drop_last": sampler.drop_last, "global_batch": sampler.global_batch}
