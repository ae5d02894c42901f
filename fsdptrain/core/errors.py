"""User-facing errors.

A `UserError` is a mistake in what the user gave us (config, data, launch
environment, checkpoint). The CLI prints its message as one line and exits
with status 2; it never shows a traceback for these. Everything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message names the file/key and the fix."""


class ConfigError(UserError):
    """Invalid configuration: unknown key, wrong type or bad value."""


class LaunchError(UserError):
    """Bad launch environment (torchrun variables, devices, rendezvous)."""


class TrainingError(UserError):
    """The run stopped on purpose (non-finite loss, ...); the message says where."""


class PeerLost(TrainingError):
    """Another rank died without a word; the lowest surviving rank (`print_rank`) says which one."""

    def __init__(self, msg: str, print_rank: int):
        super().__init__(msg)
        self.print_rank = print_rank


EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request, checkpoint saved; running the same command continues


class RunStopped(Exception):
    """Training stopped on request (a signal, the job's time limit) after saving a checkpoint. The CLI prints
    the message on rank 0 and exits with EXIT_STOPPED; rerunning the same command continues."""
