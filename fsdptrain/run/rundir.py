"""Run-directory chores: the output_dir lock, what a run writes besides checkpoints, and tidying it.

One run at a time: rank 0 holds `output_dir/.fsdptrain.lock` (host, pid, start time) for the whole run; a
second run on the same output_dir refuses with one line naming the first. A lock left by a dead run is taken
over with a message: on the same host when its process is gone, from another host when it was not refreshed
for LOCK_STALE_S (a live run refreshes it every LOCK_REFRESH_S).

A fresh start in a used output_dir moves the earlier run's outputs into `previous-N/` (never overwrites or
mixes them), but only when the folder holds an fsdptrain run; files of the same names that fsdptrain did not
write stop the start instead. A resumed run drops the metrics.jsonl records of steps it is about to run
again; config.yaml holds the resolved config of the run, written only once every check has passed.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..config.schema import Config, dump_yaml
from ..core import log
from ..core.errors import LaunchError, UserError
from ..core.files import write_atomic
from ..core.units import rank_ranges
from ..dist.distributed import DistInfo, all_gather_rows
from .checkpoint import SUBDIR

LOCK_FILE = ".fsdptrain.lock"
LOCK_REFRESH_S = 60.0
LOCK_STALE_S = 600.0

# What a run writes into output_dir; a fresh start moves an earlier run's copies aside instead of mixing or
# overwriting them (checkpoints of the same step names would be replaced, then pruned by keep_last).
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "tb", "wandb", "memory", SUBDIR, "hf")


def is_run_dir(output_dir: Path) -> bool:
    """Whether the folder holds outputs of an fsdptrain run (its metrics or checkpoints)."""
    return (output_dir / "metrics.jsonl").is_file() or (output_dir / SUBDIR).is_dir()


def check_fresh_start(output_dir: Path) -> None:
    """A fresh start may archive an earlier run's outputs, never files of those names that are not a run's."""
    present = [name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    if present and not is_run_dir(output_dir):
        raise UserError(f"output_dir: {output_dir} holds {', '.join(present)} but no fsdptrain run (no metrics.jsonl "
                        f"or {SUBDIR}/); give an empty or new folder as output_dir")


def archive_previous_run(output_dir: Path) -> Optional[Path]:
    """On a fresh start in a used output_dir: move its earlier outputs into output_dir/previous-N; returns that
    folder."""
    present = [name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    if not present:
        return None
    check_fresh_start(output_dir)
    n = 1
    while (output_dir / f"previous-{n}").exists():
        n += 1
    dest = output_dir / f"previous-{n}"
    dest.mkdir()
    for name in present:
        os.replace(output_dir / name, dest / name)
    return dest


def prepare(output_dir: Path, cfg: Config, fresh: bool) -> Optional[Path]:
    """Rank 0, once every check of the start has passed: archive an earlier run on a fresh start, write
    config.yaml. Returns where an earlier run's outputs were moved, if anywhere."""
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
    write_atomic(path, "".join(k + "\n" for k in kept))


# ----------------------------------------------------------------------------- the output_dir lock


@dataclass
class RunLock:
    path: Path
    refreshed: float

    def refresh(self) -> None:
        """Show the run is alive (cheap; touches the file at most every LOCK_REFRESH_S)."""
        now = time.monotonic()
        if now - self.refreshed >= LOCK_REFRESH_S:
            self.refreshed = now
            try:
                os.utime(self.path)
            except OSError:
                pass  # the lock is advisory; a missing file only weakens it

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass


def _holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}  # unreadable: a lock cut short by a crash


def _alive(holder: dict, path: Path) -> bool:
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # another user's live process
    try:
        return time.time() - path.stat().st_mtime < LOCK_STALE_S
    except OSError:
        return False


def lock(output_dir: Path) -> RunLock:
    """Rank 0: create output_dir (if needed) and take its lock, or fail in one line naming the holder."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"output_dir: cannot create {output_dir} ({e.strerror}); give a writable folder") from None
    path = output_dir / LOCK_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        holder = _holder(path)
        who = f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"
        if _alive(holder, path):
            raise UserError(f"output_dir: {output_dir} is in use by another run ({who}; lock {path}); wait for it to "
                            f"end or use another output_dir; if that run is dead, delete {path}") from None
        log.info(f"output_dir: took over the lock of a run that is no longer running ({who})")
        write_atomic(path, json.dumps(me))
        return RunLock(path, time.monotonic())
    except OSError as e:
        raise UserError(f"output_dir: cannot write in {output_dir} ({e.strerror}); give a writable folder") from None
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(me))
    return RunLock(path, time.monotonic())


def check_shared(output_dir: Path, info: DistInfo) -> None:
    """Every rank must see output_dir (every rank writes checkpoint shards there, rank 0 seals them): rank 0
    writes a probe file, every rank looks for it, and all ranks stop with one line if any does not see it.
    Collective."""
    if info.world_size == 1:
        return
    box = [secrets.token_hex(8) if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    probe = output_dir / f".fsdptrain-probe-{box[0]}"
    if info.is_main:
        probe.write_text(socket.gethostname())
    dist.barrier()
    seen = torch.tensor([int(probe.is_file())], dtype=torch.int64, device=info.device)
    rows = all_gather_rows(seen, info.world_size).flatten().tolist()
    hosts: list = [None] * info.world_size
    dist.all_gather_object(hosts, socket.gethostname())
    if info.is_main:
        probe.unlink(missing_ok=True)
    blind = [r for r, ok in enumerate(rows) if not ok]
    if blind:
        where = ", ".join(sorted({str(hosts[r]) for r in blind}))
        raise LaunchError(f"output_dir: {output_dir} is not shared by all nodes: rank(s) {rank_ranges(blind)} on "
                          f"host(s) {where} do not see the file rank 0 wrote there; every rank writes checkpoint "
                          "shards into output_dir, so put it on a file system every node mounts (an absolute path "
                          "on NFS, Lustre, ...)")


def note_stop(msg: str) -> None:
    """Rank 0, after a requested stop: write the message to $FSDPTRAIN_STOP_FILE when set, so a job script
    (launch/slurm.sbatch) knows the run stopped on request with its checkpoint saved, and requeues itself."""
    target = os.environ.get("FSDPTRAIN_STOP_FILE")
    if not target:
        return
    path = Path(target)
    try:
        write_atomic(path, msg + "\n")
    except OSError as e:
        log.info(f"FSDPTRAIN_STOP_FILE: cannot write {path} ({e.strerror}); the job script will not requeue")
