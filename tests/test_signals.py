"""Stopping when a cluster says stop: SIGTERM / SIGINT / SIGUSR1 and the job's time limit.

A signal sets a flag; at the next step boundary every rank agrees, saves a checkpoint, prints one line and
exits with status 75. Rerunning the same command continues, and the losses of the interrupted and resumed
run are bitwise those of an uninterrupted one. Also: a second Ctrl-C stops at once (130), and the output_dir
lock refuses a second run and is taken over from a dead one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import env, free_port, read_metrics, run_cli

pytestmark = pytest.mark.slow  # see docs/testing.md: the quick loop is -m "not slow"

STEPS = 60
ARGS = ["train", f"train.max_steps={STEPS}", "data.synthetic_examples=480", "logging.log_every=1",
        "logging.progress=lines", "logging.tensorboard=false", "train.micro_batch_size=8"]


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir)]


def start(args: list[str], torchrun: int = 0, **extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fsdptrain", *args]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(torchrun), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), "-m", "fsdptrain", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(**extra))


def wait_for_steps(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.02)
    raise AssertionError(f"no {n} steps within {timeout} s")


def worker_pids(run_dir: Path) -> dict[int, int]:
    """{rank: pid} of the training processes whose command line names run_dir (torchrun workers carry RANK)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            environ = dict(x.split(b"=", 1) for x in (proc / "environ").read_bytes().split(b"\0") if b"=" in x)
        except OSError:
            continue
        if f"output_dir={run_dir}".encode() in cmd and b"torch.distributed.run" not in b" ".join(cmd) \
                and b"RANK" in environ:
            found[int(environ[b"RANK"])] = int(proc.name)
    return found


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs: one process and two ranks."""
    root = tmp_path_factory.mktemp("signals")
    one = root / "one"
    proc = run_cli([*ARGS, f"output_dir={one}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = root / "two"
    p = start([*ARGS, f"output_dir={two}"], torchrun=2)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out[-3000:]
    return root, losses(one), losses(two)


def test_sigterm_saves_stops_with_75_and_the_rerun_continues_bitwise(reference):
    root, expected, _ = reference
    run = root / "term"
    p = start([*ARGS, f"output_dir={run}"])
    wait_for_steps(run, 5, p)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 75, out[-3000:]
    stop_lines = [line for line in out.splitlines() if "stopped by SIGTERM at step" in line]
    assert len(stop_lines) == 1, out
    step = int(stop_lines[0].split("at step ")[1].split(";")[0])
    assert 5 <= step < STEPS
    assert stop_lines[0] == (f"fsdptrain: stopped by SIGTERM at step {step}; checkpoint saved to "
                             f"{run}/checkpoints/step-{step:08d}; rerun the same command to continue")
    assert (run / "checkpoints" / f"step-{step:08d}" / "COMPLETE.json").is_file()
    assert "Traceback" not in out
    assert not (run / ".fsdptrain.lock").exists()  # released on the way out

    again = run_cli([*ARGS, f"output_dir={run}"], timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {run}/checkpoints/step-{step:08d}" in again.stdout
    assert losses(run) == expected  # bitwise: the stop lost nothing and changed nothing


def test_sigterm_to_torchrun_stops_every_rank_and_the_rerun_continues_bitwise(reference):
    root, _, expected = reference
    run = root / "term2"
    p = start([*ARGS, f"output_dir={run}"], torchrun=2)
    wait_for_steps(run, 5, p)
    p.send_signal(signal.SIGTERM)  # torchrun forwards it to its workers
    out = p.communicate(timeout=120)[0]
    assert p.returncode != 0
    stop = [line for line in out.splitlines() if "stopped by SIGTERM at step" in line]
    assert len(stop) == 1, out[-4000:]  # rank 0 says it once
    step = int(stop[0].split("at step ")[1].split(";")[0])
    assert (run / "checkpoints" / f"step-{step:08d}" / "COMPLETE.json").is_file()
    p = start([*ARGS, f"output_dir={run}"], torchrun=2)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out[-3000:]
    assert losses(run) == expected


def test_sigusr1_to_one_rank_stops_both_at_the_same_step(reference, tmp_path):
    run = tmp_path / "usr1"
    p = start([*ARGS, f"output_dir={run}"], torchrun=2)
    wait_for_steps(run, 5, p)
    pids = worker_pids(run)
    assert sorted(pids) == [0, 1], pids
    os.kill(pids[1], signal.SIGUSR1)  # only rank 1 hears it (a signal that reached one node)
    out = p.communicate(timeout=120)[0]
    assert "fsdptrain: rank 1 got SIGUSR1" in out, out[-3000:]
    stop = [line for line in out.splitlines() if "stopped by SIGUSR1 at step" in line]
    assert len(stop) == 1, out[-3000:]
    step = int(stop[0].split("at step ")[1].split(";")[0])
    assert step < STEPS
    ckpt = run / "checkpoints" / f"step-{step:08d}"
    assert sorted(f.name for f in ckpt.iterdir() if f.suffix == ".distcp") == ["__0_0.distcp", "__1_0.distcp"]
    p = start([*ARGS, f"output_dir={run}"], torchrun=2)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out[-3000:]
    assert losses(run) == reference[2]  # bitwise, as if never stopped


def test_second_sigint_stops_at_once_without_saving(capsys):
    """In-process: the first SIGINT only sets the flag (the request decides 'SIGINT'), the second raises
    KeyboardInterrupt, which the CLI turns into one line and status 130 (not click's 'Aborted!')."""

    from fsdptrain.cli import friendly_errors
    from fsdptrain.dist.stopping import StopRequests

    stop = StopRequests()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert stop.decide(stop.local_code()) == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored

    @friendly_errors
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_:
        interrupted()
    assert exit_.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fsdptrain: error: interrupted: stopped at once without saving; rerun the same command to "
                   "continue from the last checkpoint"]


def test_the_jobs_time_limit_saves_and_stops_before_it_runs_out(tmp_path):
    run = tmp_path / "limit"
    end = int(time.time()) + 3600  # Slurm's end time: an hour away, but we save 59.9 minutes before it
    proc = run_cli([*ARGS[:1], "train.max_steps=100000", *ARGS[2:], f"output_dir={run}",
                    "checkpoint.save_before_minutes=59.9"], timeout=300, SLURM_JOB_END_TIME=str(end))
    assert proc.returncode == 75, proc.stderr[-3000:]
    stop = [line for line in proc.stdout.splitlines() if "stopped by" in line]
    assert len(stop) == 1 and stop[0].startswith(
        "fsdptrain: stopped by the job's time limit (SLURM_JOB_END_TIME, saving 59.9 min before it) at step "), stop
    step = int(stop[0].split("at step ")[1].split(";")[0])
    assert (run / "checkpoints" / f"step-{step:08d}" / "COMPLETE.json").is_file()


def test_a_second_run_on_the_same_output_dir_refuses_and_a_dead_runs_lock_is_taken_over(tmp_path):
    run = tmp_path / "locked"
    run.mkdir()
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-12-01 10:00:00"}
    (run / ".fsdptrain.lock").write_text(json.dumps(me))  # held by a live process (this one)
    (run / "config.yaml").write_text("a run's config\n")
    (run / "metrics.jsonl").write_text("")
    before = {f.name: f.read_text() for f in run.iterdir()}
    second = run_cli([*ARGS, f"output_dir={run}", "checkpoint.resume=none"], timeout=120)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"fsdptrain: error: output_dir: {run} is in use by another run (host {socket.gethostname()}, pid "
        f"{os.getpid()}, started 2026-12-01 10:00:00; lock {run}/.fsdptrain.lock); wait for it to end or use another "
        f"output_dir; if that run is dead, delete {run}/.fsdptrain.lock"]
    assert {f.name: f.read_text() for f in run.iterdir()} == before  # nothing moved, nothing written

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    (run / ".fsdptrain.lock").write_text(json.dumps({**me, "pid": dead.pid}))
    third = run_cli([*ARGS, f"output_dir={run}"], timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"output_dir: took over the lock of a run that is no longer running (host {socket.gethostname()}, " \
           f"pid {dead.pid}" in third.stdout
    assert not (run / ".fsdptrain.lock").exists()  # released at the end
    assert (run / "previous-1" / "config.yaml").read_text() == "a run's config\n"  # the earlier run, archived


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_earlier_checkpoints(tmp_path):
    run = tmp_path / "full"
    cmd = [sys.executable, "-m", "tests.workers.fault_worker", *ARGS[:1], "train.max_steps=6", *ARGS[2:],
           f"output_dir={run}", "checkpoint.save_every=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=env(FSDPTRAIN_TEST_FAULTS="0:enospc:4:0"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.fullmatch(re.escape(f"fsdptrain: error: checkpoint: could not write step 4 into {run}/checkpoints (No "
                                  "space left on device; ") + r"\d+(\.\d\d \wiB| B) free there" + re.escape(
        "); the earlier checkpoints there are intact: free space (or fix the folder) and rerun the same command to "
        "continue from the newest one") + "\n", proc.stderr), proc.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002"]
    assert (run / "checkpoints" / "step-00000002" / "COMPLETE.json").is_file()
