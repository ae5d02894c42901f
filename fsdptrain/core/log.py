"""User-facing output: the one channel every message of a run goes through.

`info` is for start-up lines, summaries and warnings: printed by the main rank
(rank 0), dropped on the others, so an 16-rank run prints each line once.
`rank_line` is for what concerns one rank (its join line, its failure) and is
printed by every rank. `error` writes an `fsdptrain: error:` line to stderr.
While a progress bar is on screen, metrics.py installs the bar's writer with
`set_writer`, so messages are printed above the bar instead of tearing it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Optional

_main = True  # this process prints `info` lines
_writer: Optional[Callable[[str], None]] = None  # the progress bar's writer while a bar is open


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
    else:
        print(msg, flush=True)


def info(msg: str) -> None:
    """A message of the run: printed once, by the main rank."""
    if _main:
        _emit(msg)


def rank_line(msg: str) -> None:
    """A message about this rank: printed by every rank."""
    _emit(msg)


def error(msg: str) -> None:
    """`fsdptrain: error: msg` on stderr, from this rank."""
    sys.stdout.flush()
    print(f"fsdptrain: error: {msg}", file=sys.stderr, flush=True)
