"""Test harness: run `fsdptrain` under torchrun and SIGKILL one worker at a chosen point.

FSDPTRAIN_TEST_FAULTS="ATTEMPT:save:STEP:RANK,..." where ATTEMPT is torchrun's
restart count (TORCHELASTIC_RESTART_COUNT): the rank kills itself inside the
checkpoint of step STEP, once it wrote its DCP data (before the metadata and
the marker exist); "ATTEMPT:enospc:STEP:RANK" makes that rank's DCP write of
step STEP fail as a full disk does. The faults live here, in the tests, not in
fsdptrain.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys

from torch.distributed.checkpoint import FileSystemWriter

from fsdptrain.run import checkpoint


def _faults() -> list[tuple[str, int]]:
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    rank = os.environ.get("RANK", "0")
    out = []
    for item in filter(None, os.environ.get("FSDPTRAIN_TEST_FAULTS", "").split(",")):
        a, point, step, r = item.split(":")
        if a == attempt and r == rank:
            out.append((point, int(step)))
    return out


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install() -> None:
    faults = _faults()
    state = {"saving": None}

    save = checkpoint.Checkpointer.save

    def patched_save(self, step, *args, **kwargs):
        state["saving"] = step
        try:
            return save(self, step, *args, **kwargs)
        finally:
            state["saving"] = None

    write_data = FileSystemWriter.write_data

    def patched_write_data(self, plan, planner):
        if state["saving"] is not None and ("enospc", state["saving"]) in faults:
            raise OSError(28, "No space left on device")  # what a full disk says
        result = write_data(self, plan, planner)
        if state["saving"] is not None and ("save", state["saving"]) in faults:
            result.wait()
            print(f"fault_worker: killing rank {os.environ.get('RANK')} while saving step {state['saving']}",
                  flush=True)
            _die()
        return result

    checkpoint.Checkpointer.save = patched_save
    FileSystemWriter.write_data = patched_write_data


if __name__ == "__main__":
    install()
    # fsdptrain's own entry point, its end included (a succeeded rank of a multi-process run leaves by os._exit)
    runpy.run_module("fsdptrain", run_name="__main__", alter_sys=True)
