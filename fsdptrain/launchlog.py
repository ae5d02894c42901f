"""What a launched run shows: torchrun's whole output kept in a log file, the run's own lines on the terminal.

When a rank dies, torchrun's agent is killed or stopped by a signal, fsdptrain's ranks say what happened in one
line each; torchrun and c10d then add 50-120 lines a user reads as a crash: the agent's logging (`W1206
08:04:30.147000 6582 .../api.py:1028] Sending process 6587 closing signal SIGTERM`), its `ChildFailedError` or
`SignalException` traceback with a box of exit codes, and c10d's C++ warnings with their `frame #N` stacks.

`exec_torchrun` (launch.py's last step) therefore points torchrun's stdout and stderr, which its workers inherit,
at a log file, starts a follower process that prints the file as it grows minus those blocks (`Noise`), and
execs torchrun. torchrun keeps the launcher's pid, so signals reach it as before (the user's kill, Ctrl-C, Slurm).
The follower ignores signals and ends once every process that writes the log (torchrun and its workers, orphans
included) has closed it: the launcher takes a shared flock on the file before handing it over, and the lock lasts
as long as any of them holds the file open. When it held something back, or torchrun ended, the follower says in
one line where the full log is.
"""

from __future__ import annotations

import codecs
import fcntl
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

PREFIX = "fsdptrain-launch"
_RANK = r"(\[rank\d+\]: ?)?"
# glog-style lines: torchrun's Python logging (`W1206 08:04:30.147000 6582 path.py:1028] `) and c10's C++ logging
# (`[rank1]:[W1206 08:04:53.832980120 TCPStore.cpp:106] `)
LOGGING = re.compile(_RANK + r"(\[[IWEF]\d{4} [\d:.]+ (\d+ )?\S+:\d+\]|[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\])")
# what follows such a line: a C++ warning's stack, torchrun's OMP_NUM_THREADS banner
CPP_TAIL = re.compile(r"(Exception raised from |frame #\d+: |<omitting python frames>|\s*$|\*+\s*$|Setting "
                      r"OMP_NUM_THREADS environment variable for each process)")
TRACEBACK = re.compile(_RANK + r"Traceback \(most recent call last\):")
CHAINED = ("During handling of the above exception", "The above exception was the direct cause")


class Noise:
    """Line by line: whether a line belongs to torchrun's or c10d's own report (logging, tracebacks, C++
    stacks) rather than to the run. Tracebacks are held whole: the indented lines, the exception line, and for
    ChildFailedError the box of exit codes that follows it."""

    def __init__(self) -> None:
        self.state = "run"  # run | cpp | traceback | box | after
        self.rules = 0  # '=====' lines of the box seen
        self.held = 0

    def __call__(self, line: str) -> bool:
        text = line.rstrip("\r\n")
        if self.state == "cpp":
            if CPP_TAIL.match(text):
                return self._hold()
            self.state = "run"
        if self.state == "traceback":
            body = re.sub(r"^\[rank\d+\]: ?", "", text)
            if body[:1] in (" ", "\t") or not body.strip():
                return self._hold()
            self.state, self.rules = ("box" if "ChildFailedError" in body else "after"), 0
            return self._hold()  # the exception line
        if self.state == "box":
            self.rules += text.startswith("=====")
            if self.rules >= 2:
                self.state = "after"
            return self._hold()
        if self.state == "after":
            if not text.strip() or text.startswith(CHAINED):
                return self._hold()
            self.state = "run"
        if LOGGING.match(text):
            self.state = "cpp"
            return self._hold()
        if TRACEBACK.match(text):
            self.state = "traceback"
            return self._hold()
        return False

    def _hold(self) -> bool:
        self.held += 1
        return True


def lines_of(text: str) -> list[str]:
    """`text` cut after every newline and carriage return (a progress bar redraws its line with '\\r'), the
    terminators kept; the last piece may be unfinished."""
    return re.findall(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$", text)


def log_path(env: dict[str, str], node_rank: int) -> Optional[Path]:
    """The file torchrun's output goes to: in FSDPTRAIN_LAUNCH_LOG (a folder; default: the temporary folder),
    named after the Slurm job (if any), the node, the time and this pid; None with FSDPTRAIN_LAUNCH_LOG=0."""
    where = env.get("FSDPTRAIN_LAUNCH_LOG", "").strip()
    if where in ("0", "off", "none"):
        return None
    import tempfile

    folder = Path(where or tempfile.gettempdir())
    job = f"job{env['SLURM_JOB_ID']}-" if env.get("SLURM_JOB_ID") else ""
    return folder / f"fsdptrain-launch-{job}node{node_rank}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def follow(path: Path, write: Callable[[str], None], parent: int, poll: float = 0.1, quiet_s: float = 10.0,
           orphans_s: float = 120.0) -> Noise:
    """Print the log at `path` as it grows, minus the noise, until every writer has closed it. The line naming
    the log comes when torchrun (`parent`) ends; before that once something was held back and the output then
    stayed quiet for `quiet_s` seconds (a hang), after it once more at the end if something was held back since.
    Orphaned workers are followed for at most `orphans_s` seconds after torchrun ended."""
    noise, decoder, rest = Noise(), codecs.getincrementaldecoder("utf-8")("replace"), ""
    unsaid, said, ended_at, last = False, False, None, time.monotonic()
    with open(path, "rb") as f:
        while True:
            try:  # every writer gone (the shared lock released)
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                done = True
            except BlockingIOError:
                done = False
            now = time.monotonic()
            ended = ended_at is None and os.getppid() != parent  # torchrun ended just now
            ended_at = now if ended else ended_at
            finished = done or (ended_at is not None and now - ended_at > orphans_s)
            chunk = f.read()  # read after those checks: what was written before them is in it
            if chunk or finished:
                last = now if chunk else last
                pieces = lines_of(rest + decoder.decode(chunk, final=finished))
                rest = pieces.pop() if pieces and not pieces[-1].endswith(("\n", "\r")) else ""
                if finished and rest:
                    pieces, rest = [*pieces, rest + "\n"], ""
                for piece in pieces:
                    if noise(piece):
                        unsaid = True
                    else:
                        write(piece)
            if ((ended and (unsaid or not said)) or (finished and unsaid)
                    or (unsaid and ended_at is None and now - last >= quiet_s)):
                held = ("torchrun's own report (tracebacks, exit codes, C++ warnings) is left out here; "
                        if noise.held else "")
                write(f"{PREFIX}: {held}the full output is in {path}\n")
                unsaid, said = False, True
            if finished:
                return noise
            time.sleep(poll)


def _follower(path: Path, parent: int) -> None:
    """The follower process: signals are torchrun's to handle; a closed terminal ends it quietly."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        follow(path, write, parent)
    except (BrokenPipeError, KeyboardInterrupt):
        pass
    finally:
        os._exit(0)


def open_log(path: Path) -> int:
    """The log file opened for torchrun to write (appending), its shared lock taken: the lock lasts while torchrun,
    its workers or their children hold the file open. OSError when the folder cannot be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def exec_torchrun(cmd: list[str], env: dict[str, str], log: Optional[tuple[int, Path]]) -> None:
    """Replace this process with torchrun (`cmd`); with a log (`open_log`'s descriptor and the file), its output
    goes there and a follower process shows the run's own lines here. Does not return."""
    if log is None:
        os.execvpe(cmd[0], cmd, env)
    fd, path = log
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    if os.fork() == 0:
        os.close(fd)  # the follower must not keep the writers' lock alive
        _follower(path, parent)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.execvpe(cmd[0], cmd, env)
