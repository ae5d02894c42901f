"""The scratch folder of parallel.optimizer_offload: nvme, and the rules that keep it safe to point anywhere.

`parallel.offload_dir` is a node-local folder the user names; fsdptrain treats it as scratch it shares with no
one but itself:
- each rank writes only inside its own subfolder `fsdptrain-offload-<run>-rank<NNNNN>` (run: a hash of the
  resolved output_dir, so two runs can share one drive), made under a `.creating` name and renamed once its
  marker file says who wrote it;
- a folder holding anything else (the user's files, a link) is refused, not written into;
- the subfolder of this run and rank left by a crash (and those of ranks beyond this run's world size) are
  deleted at the start; the rank's own subfolder is deleted at the end (`Scratch.close`);
- a folder on a network file system gets a warning (the moments would cross the network every step; per-rank
  subfolders keep it correct), one that cannot be made or written to is one line.
The free-space check (`check_space`) runs twice: before the model is built, on the state's size the memory
estimator predicts (the trainer), and exactly when the optimizer allocates its file (optim_nvme.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..core import log
from ..core.errors import UserError
from ..core.units import format_bytes

PREFIX = "fsdptrain-offload-"
NAME = re.compile(r"^fsdptrain-offload-([0-9a-f]{12})-rank(\d{5})(\.creating)?$")
MARKER = "fsdptrain-offload.json"
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
              "fuse.sshfs", "fuse.s3fs", "9p", "afs", "orangefs", "pvfs2", "wekafs")


class OffloadDirError(UserError):
    """parallel.offload_dir cannot be used (not writable, foreign content, too small, a failed write)."""


def run_key(output_dir: str | Path) -> str:
    """The run's part of the subfolder names: the same output_dir gives the same key after a crash."""
    return hashlib.sha1(str(Path(output_dir).resolve()).encode()).hexdigest()[:12]


def folder_name(key: str, rank: int) -> str:
    return f"{PREFIX}{key}-rank{rank:05d}"


def mount_type(path: Path, mounts: str) -> tuple[str, str]:
    """(mount point, file system type) of `path` from /proc/mounts-formatted text: the longest matching mount."""
    best = ("/", "")
    target = str(path)
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, parts[2])
    return best


def network_warning(root: Path, mounts: Optional[str] = None) -> Optional[str]:
    """A warning line when `root` is on a network file system, else None."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    point, fstype = mount_type(root.resolve(), mounts)
    if fstype in NETWORK_FS or fstype.startswith("fuse.") and fstype[5:] in NETWORK_FS:
        return (f"parallel.offload_dir: {root} is on {fstype} (mounted at {point}), a network file system: every "
                "step streams the moments over the network and nodes share its bandwidth; give a node-local "
                "folder (an NVMe drive) for speed")
    return None


def foreign_entries(root: Path) -> list[str]:
    """Names in `root` that fsdptrain did not write: anything but its offload subfolders (real folders)."""
    return sorted(e.name for e in root.iterdir() if not NAME.match(e.name) or e.is_symlink() or not e.is_dir())


def prepare_root(offload_dir: str) -> Path:
    """The offload folder, made if needed, checked to be a writable folder holding only fsdptrain's subfolders."""
    root = Path(offload_dir).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OffloadDirError(f"parallel.offload_dir: {root} is a file; give a folder (new or empty)") from None
    except OSError as e:
        raise OffloadDirError(f"parallel.offload_dir: cannot create {root} ({e.strerror}); give a folder this "
                              "user can write") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise OffloadDirError(f"parallel.offload_dir: {root} is not writable for this user; give a folder this "
                              "user can write (node-local, e.g. on an NVMe drive)")
    foreign = foreign_entries(root)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OffloadDirError(f"parallel.offload_dir: {root} holds {shown}, not written by fsdptrain; give an empty "
                              "folder (or a new one) that only fsdptrain's optimizer offload uses")
    return root


@dataclass
class Scratch:
    """One rank's marked subfolder in the offload folder; `close` deletes it."""
    root: Path
    folder: Path

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def clear_stale(root: Path, key: str, rank: int, world_size: int) -> list[str]:
    """Delete this run's subfolders a crash left: this rank's, and those of ranks beyond the world size (no rank
    of this run writes them). Other runs' subfolders stay. Returns the names deleted."""
    removed = []
    for entry in sorted(root.iterdir()):
        m = NAME.match(entry.name)
        if m and m[1] == key and (int(m[2]) == rank or int(m[2]) >= world_size) and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


def claim(offload_dir: str, output_dir: str | Path, rank: int, world_size: int) -> Scratch:
    """This rank's fresh, marked subfolder of parallel.offload_dir (the checks above first)."""
    root = prepare_root(offload_dir)
    if rank == 0 and (warning := network_warning(root)) is not None:
        log.info(warning)
    key = run_key(output_dir)
    removed = clear_stale(root, key, rank, world_size)
    if removed:
        log.rank_line(f"parallel.offload_dir: removed this run's offload files left by a crash: {', '.join(removed)}")
    folder = root / folder_name(key, rank)
    tmp = folder.with_name(folder.name + ".creating")
    try:
        tmp.mkdir()
        (tmp / MARKER).write_text(json.dumps({"output_dir": str(Path(output_dir).resolve()), "rank": rank,
                                              "pid": os.getpid(), "host": os.uname().nodename}) + "\n")
        os.rename(tmp, folder)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OffloadDirError(f"parallel.offload_dir: cannot write into {root} ({e.strerror}); give a folder this "
                              "user can write with free space") from None
    return Scratch(root, folder)


def free_bytes(folder: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def check_space(root: Path, need: int, local_world: int, free: Optional[int] = None) -> None:
    """One line when `root`'s file system has less free space than this rank's `need` (`free`: measured already)."""
    free = free_bytes(root) if free is None else free
    if free is not None and free < need:
        node = f" ({local_world} ranks on this node: {format_bytes(need * local_world)} in all)" \
            if local_world > 1 else ""
        raise OffloadDirError(f"parallel.offload_dir: {root} has {format_bytes(free)} free and this rank's optimizer "
                              f"state needs {format_bytes(need)}{node}; free space there, or give a larger drive")
