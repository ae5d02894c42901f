"""Stopping cleanly when a cluster says stop: signals and the job's time limit, agreed at step boundaries.

SIGTERM (what Slurm and Kubernetes send before killing; torchrun forwards it to its workers), SIGINT (Ctrl-C)
and SIGUSR1 (Slurm's `--signal=USR1@120`) only set a flag: a signal can arrive inside a collective or a
checkpoint write, where stopping at once would lose or corrupt work. A second SIGINT stops at once. The
job's time limit (`SLURM_JOB_END_TIME`, or `checkpoint.wall_time_minutes` from the start) is a stop
request too, `checkpoint.save_before_minutes` before it runs out.

Every rank must stop at the same step (a signal may reach only some ranks, e.g. one node), so all ranks save
the same step and exit together with status core.errors.EXIT_STOPPED (75). The trainer carries each rank's
request (`local_code()`) in the step's own all_gather of the losses (trainer.train_step) and turns the largest
code into the reason (`decide()`): the agreement costs no collective and no host sync of its own.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType
from typing import Optional

from ..core import log

_CODES = {1: "SIGTERM", 2: "SIGINT", 3: "SIGUSR1", 4: "the job's time limit"}
_SIGNALS = {signal.SIGTERM: 1, signal.SIGINT: 2, signal.SIGUSR1: 3}


class StopRequests:
    """Installed for the training loop: `local_code()` rides in each step's all_gather and `decide()` reads the
    largest code over the ranks; `close()` restores the handlers."""

    def __init__(self, deadline: Optional[float] = None, deadline_source: str = ""):
        self.code = 0  # the first request's code on this rank (0: none)
        self.deadline = deadline  # time.time() at which to stop, or None
        self.deadline_source = deadline_source
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.getsignal(s) for s in _SIGNALS}
            for s in _SIGNALS:
                signal.signal(s, self._on_signal)

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        if signum == signal.SIGINT and self.code == 2:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
        if not self.code:
            self.code = _SIGNALS[signal.Signals(signum)]
            log.signal_line(f"fsdptrain: rank {os.environ.get('RANK', '0')} got {_CODES[self.code]}; saving a "
                            "checkpoint at the end of this step, then stopping" + (" (Ctrl-C again: stop at once)"
                                                                                   if self.code == 2 else ""))

    def local_code(self) -> int:
        """This rank's request: 0 none, else the code of the first signal, or of the job's time limit."""
        if not self.code and self.deadline is not None and time.time() >= self.deadline:
            return 4
        return self.code

    def decide(self, code: int) -> Optional[str]:
        """The reason for stopping given the largest code over all ranks (None: go on)."""
        if not code:
            return None
        return _CODES[code] + (f" ({self.deadline_source})" if code == 4 else "")

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def job_deadline(save_before_minutes: float, wall_time_minutes: Optional[float],
                 started: float) -> tuple[Optional[float], str]:
    """When to stop for the job's time limit: (time.time() to stop at, where the limit came from), or (None, "")."""
    end_env = os.environ.get("SLURM_JOB_END_TIME", "")
    if end_env.isdigit():
        end, source = float(end_env), "SLURM_JOB_END_TIME"
    elif wall_time_minutes:
        end, source = started + 60 * wall_time_minutes, "checkpoint.wall_time_minutes"
    else:
        return None, ""
    stop_at = end - 60 * save_before_minutes
    if stop_at <= started:
        log.info(f"checkpoint.save_before_minutes: the job's time limit ({source}) is less than "
                 f"{save_before_minutes:g} minutes away; not stopping early for it")
        return None, ""
    return stop_at, f"{source}, saving {save_before_minutes:g} min before it"
