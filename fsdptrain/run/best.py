"""The best checkpoint (checkpoint.keep_best): which saved step had the lowest eval loss.

checkpoints/best.json records it ({"step", "eval_loss", "checkpoint"}); it is
written by rank 0 after a checkpoint is sealed, to a temporary name and renamed,
and keep_last pruning leaves the folder it names alone. A checkpoint's eval loss
is the evaluation after its own step, so save steps should be eval steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..core.errors import UserError
from ..core.files import read_json, write_atomic

BEST_FILE = "best.json"
SUBDIR = "checkpoints"


def read_best(root: Path) -> Optional[dict]:
    """best.json of a checkpoints/ folder, or None when there is none."""
    path = root / BEST_FILE
    if not path.is_file():
        return None
    return read_json(path, "the best-checkpoint record", fix="delete it; the next evaluated save writes it again")


def update_best(root: Path, step: int, loss: float, folder: str) -> bool:
    """Record `folder` (saved at `step`, eval loss `loss`) when it beats the recorded best; True when it did."""
    best = read_best(root)
    if best is not None and (root / best["checkpoint"]).is_dir() and best["eval_loss"] <= loss:
        return False
    write_atomic(root / BEST_FILE, json.dumps({"step": step, "eval_loss": loss, "checkpoint": folder}) + "\n")
    return True


def best_checkpoint(run: str | Path) -> Path:
    """The best checkpoint of a run directory (or of its checkpoints/ folder), for `export --best`."""
    run = Path(run)
    root = run if (run / BEST_FILE).is_file() else run / SUBDIR
    best = read_best(root)
    if best is None:
        raise UserError(f"{run}: no {SUBDIR}/{BEST_FILE}; the run did not keep a best checkpoint (set "
                        "checkpoint.keep_best=true with eval data and train.eval_every)")
    path = root / str(best.get("checkpoint", ""))
    if not path.is_dir():
        raise UserError(f"{root / BEST_FILE}: names {best.get('checkpoint')!r}, which is not in {root}; "
                        "export a step folder directly")
    return path
