"""Run-directory chores: what a run writes into output_dir besides checkpoints, and tidying it.

A fresh start in a used output_dir moves the earlier run's outputs into
`previous-N/` (never overwrites or mixes them); a resumed run drops the
metrics.jsonl records of steps it is about to run again; config.yaml holds the
resolved config of the run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from .checkpoint import SUBDIR
from .config import Config, dump_yaml

# What a run writes into output_dir; a fresh start moves an earlier run's copies aside instead of mixing or
# overwriting them (checkpoints of the same step names would be replaced, then pruned by keep_last).
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "tb", "memory", SUBDIR, "hf")


def archive_previous_run(output_dir: Path) -> Optional[Path]:
    """On a fresh start in a used output_dir: move its earlier outputs into output_dir/previous-N; returns that
    folder."""
    present = [name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    if not present:
        return None
    n = 1
    while (output_dir / f"previous-{n}").exists():
        n += 1
    dest = output_dir / f"previous-{n}"
    dest.mkdir()
    for name in present:
        os.replace(output_dir / name, dest / name)
    return dest


def prepare(output_dir: Path, cfg: Config, fresh: bool) -> Optional[Path]:
    """Rank 0, before anything is written: create output_dir, archive an earlier run on a fresh start, write
    config.yaml. Returns where an earlier run's outputs were moved, if anywhere."""
    output_dir.mkdir(parents=True, exist_ok=True)
    moved = archive_previous_run(output_dir) if fresh else None
    (output_dir / "config.yaml").write_text(dump_yaml(cfg))
    return moved


def trim_metrics(path: Path, step: int) -> None:
    """Drop metrics.jsonl records of steps after the checkpoint: they are about to be run again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) > step:
                continue
        except (json.JSONDecodeError, AttributeError):
            continue  # a line cut short by the crash
        kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    os.replace(tmp, path)
