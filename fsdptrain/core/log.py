"""User-facing output: the one channel every message of a run goes through.

`info` is for start-up lines, summaries and warnings: printed by the main rank
(rank 0), dropped on the others, so an 16-rank run prints each line once.
`rank_line` is for what concerns one rank (its join line, its failure) and is
printed by every rank. `error` writes an `fsdptrain: error:` line to stderr.
While a progress bar is on screen, metrics.py installs the bar's writer with
`set_writer`, so messages are printed above the bar instead of tearing it.
While a command checks what the user gave it (`held`), `info` lines are kept
back: a mistake found there is the only line printed, as for a config mistake.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Optional

from .errors import UserError

_main = True  # this process prints `info` lines
_writer: Optional[Callable[[str], None]] = None  # the progress bar's writer while a bar is open
_held: Optional[list[str]] = None  # `info` lines kept back while the start's checks run (`held`)


def configure(is_main: bool) -> None:
    """Called once a process knows its rank (distributed.init)."""
    global _main
    _main = is_main


def is_main() -> bool:
    return _main


def set_writer(writer: Optional[Callable[[str], None]]) -> None:
    """Route messages through `writer` (a tqdm bar's `write`) until it is reset with None."""
    global _writer
    _writer = writer


def _emit(msg: str) -> None:
    if _writer is not None:
        _writer(msg)
    else:  # one write of the whole line: print's separate write of "\n" lets another rank's line in between
        sys.stdout.write(msg + "\n")
        sys.stdout.flush()


def signal_line(msg: str) -> None:
    """A rank's line from inside a signal handler: one system call of the whole line, past Python's buffers. A
    handler runs between two bytecodes of whatever the rank was doing, a `print` among them: writing through
    the same buffered stream from there can split that line or re-enter the stream's writer (a RuntimeError).
    The ranks share the terminal or torchrun's log file (appending): one write keeps each rank's line whole."""
    try:
        fd = None if _writer is not None else sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a stream without a file (captured output)
        fd = None
    if fd is None:
        _emit(msg)
    else:
        os.write(fd, (msg + "\n").encode())


def info(msg: str) -> None:
    """A message of the run: printed once, by the main rank (later, while `held`)."""
    if _main:
        if _held is not None:
            _held.append(msg)
        else:
            _emit(msg)


@contextmanager
def held() -> Iterator[None]:
    """Keep `info` lines back inside the block, until `release()` or its end: printed then, or dropped when the
    block ends with a UserError, whose one line is then all the user sees. For the checks at a command's start
    (data, model config), so that a mistake they find is not buried under the lines of what went well."""
    global _held
    _held = []
    try:
        yield
    except UserError:
        _held = None
        raise
    finally:
        release()


def release() -> None:
    """Print the lines `held` kept back so far and stop holding (the checks have passed)."""
    global _held
    lines, _held = _held or [], None
    for msg in lines:
        _emit(msg)


def rank_line(msg: str) -> None:
    """A message about this rank: printed by every rank."""
    _emit(msg)


def error(msg: str) -> None:
    """`fsdptrain: error: msg` on stderr, from this rank."""
    sys.stdout.flush()
    sys.stderr.write(f"fsdptrain: error: {msg}\n")
    sys.stderr.flush()
