"""Hangs and lost peers: a stale launch environment, a rank killed mid-run, the torchrun agent killed mid-run.

Each ends within seconds with one line that says what happened, instead of a 30-minute process-group timeout
or hundreds of lines of C++ frames.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from tests.helpers import free_port, run_cli
from tests.test_signals import ARGS, start, wait_for_steps, worker_pids

ENDLESS = [*ARGS[:1], "train.max_steps=100000", *ARGS[2:]]


def test_stale_rank_variables_without_torchrun_fail_within_seconds(tmp_path):
    t0 = time.monotonic()
    port = free_port()
    proc = run_cli([*ARGS, f"output_dir={tmp_path / 'run'}"], timeout=120, RANK="0", WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), FSDPTRAIN_PEER_WAIT_S="3")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert time.monotonic() - t0 < 60
    assert proc.stderr.strip().splitlines() == [
        f"fsdptrain: error: [rank 0] RANK=0 WORLD_SIZE=2 are set but no torchrun agent started this process and the "
        f"other ranks did not join 127.0.0.1:{port} within 3 s; variables left in the shell? `unset RANK WORLD_SIZE "
        "LOCAL_RANK LOCAL_WORLD_SIZE` for a one-process run, or launch with torchrun (FSDPTRAIN_PEER_WAIT_S waits "
        "longer)"]
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.slow
def test_a_killed_rank_is_named_by_the_survivor(tmp_path):
    run = tmp_path / "k9"
    p = start([*ENDLESS, f"output_dir={run}"], torchrun=2)
    wait_for_steps(run, 3, p)
    pids = worker_pids(run)
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.monotonic()
    out = p.communicate(timeout=90)[0]
    assert time.monotonic() - t0 < 45
    named = [line for line in out.splitlines() if line.startswith("fsdptrain: error:")]
    assert len(named) == 1, out[-4000:]
    assert named[0].startswith(f"fsdptrain: error: [rank 0] rank 1 on host {socket.gethostname()} (pid {pids[1]}) "
                               "stopped without a word at step ")
    assert "Rerun the same command to continue from the last checkpoint" in named[0]


def test_a_killed_torchrun_agent_stops_its_workers_with_one_line_each(tmp_path):
    run = tmp_path / "agent"
    p = start([*ENDLESS, f"output_dir={run}"], torchrun=2)
    wait_for_steps(run, 3, p)
    pids = worker_pids(run)
    p.kill()  # kill -9 of torchrun: its store dies with it, the workers are orphaned
    t0 = time.monotonic()
    alive = dict(pids)
    while alive and time.monotonic() - t0 < 30:
        for r, pid in list(alive.items()):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                del alive[r]
        time.sleep(0.2)
    out = p.communicate(timeout=30)[0]
    assert not alive, f"workers still running {time.monotonic() - t0:.0f} s after the agent died: {alive}"
    gone = [line for line in out.splitlines() if "the rendezvous store at" in line]
    assert 1 <= len(gone) <= 2, out[-4000:]
    assert gone[0].startswith("fsdptrain: error: rank ") and " is gone (torchrun's agent or the first node stopped)" \
        in gone[0]
    assert out.count("sendBytes failed") <= 8  # not a block of C++ frames every second
