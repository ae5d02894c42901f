"""launch/torchrun.sh's output: torchrun's and c10d's own report of a failure goes to the log file only, the run's
lines reach the terminal, and the follower ends once every writer of the log has closed it. Also the heartbeat's
probe, which sees a vanished rendezvous store without a store call (those print C++ stacks).

The whole launcher under the three faults (a rank, the agent, SIGTERM) is in tests/test_faults.py."""

from __future__ import annotations

import datetime
import fcntl
import os
import subprocess
import sys
import time

from fsdptrain.launchlog import Noise, follow, lines_of

RUN = [
    "fsdptrain: rank 0/2 (local rank 0/2, node 0) on host vm joined 127.0.0.1:53955",
    "step 3/100000 loss 4.1281 lr 3.00e-04 grad_norm 5.843 tok/s/dev 1882 eta 37703s",
    "fsdptrain: error: [rank 0] rank 1 on host vm (pid 6588) stopped without a word at step 4 (killed, or its node "
    "was lost); the other ranks stop too. Rerun the same command to continue from the last checkpoint",
    "fsdptrain: error: rank 1: the rendezvous store at 127.0.0.1:42601 is gone (torchrun's agent or the first node "
    "stopped); stopping this rank. Rerun the same command to continue from the last checkpoint",
    "checkpoint: saved /tmp/run/checkpoints/step-00000004 in 1.64s",
]
# What torchrun 2.13 and c10d printed around those lines in the three faults (trimmed, in their own words)
OMP = """W1206 08:04:20.100000 6582 site-packages/torch/distributed/run.py:851]<SP>
W1206 08:04:20.100000 6582 site-packages/torch/distributed/run.py:851] *****************************************
*****************************************
Setting OMP_NUM_THREADS environment variable for each process to be 1 in default, to avoid your system being \
overloaded, please further tune the variable for optimal performance in your application as needed.
*****************************************
""".replace("<SP>", " ")  # torchrun's lines end in a space here
SIGTERM = ("W1206 08:04:30.147000 6582 site-packages/torch/distributed/elastic/multiprocessing/api.py:1028] Sending "
           "process 6587 closing signal SIGTERM\n")
CPP = """[rank1]:[W1206 08:04:53.832980120 TCPStore.cpp:106] [c10d] sendBytes failed on SocketImpl(fd=3, \
addr=[::ffff:127.0.0.1]:34652, remote=[::ffff:127.0.0.1]:42601): Broken pipe
Exception raised from sendBytes at /__w/pytorch/pytorch/torch/csrc/distributed/c10d/Utils.hpp:758 (most recent \
call first):
frame #0: c10::Error::Error(c10::SourceLocation, std::__cxx11::basic_string<char>) + 0x9d (0x7f9285579b8d in \
libc10.so)
frame #4: c10d::TCPStore::set(std::__cxx11::basic_string<char> const&) + 0x12d (0x7f92771460fd in libtorch_cpu.so)
<omitting python frames>
frame #22: <unknown function> + 0x1098ec (0x7f9287b278ec in /lib/x86_64-linux-gnu/libc.so.6)

"""
CHILD_FAILED = """E1206 08:04:34.892000 6582 site-packages/torch/distributed/elastic/multiprocessing/api.py:1002] \
failed (exitcode: -9) local_rank: 1 (pid: 6588) of binary: /usr/bin/python3
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "/site-packages/torch/distributed/run.py", line 1032, in <module>
    main()
           ^^^^^^^^^^^^^^^^^^
  File "/site-packages/torch/distributed/launcher/api.py", line 383, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:<SP>
============================================================
fsdptrain FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-06_08:04:34
  rank      : 0 (local_rank: 0)
  exitcode  : 2 (pid: 6587)<SP>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  exitcode  : -9 (pid: 6588)  (SIGKILL)
  traceback : Signal 9 (SIGKILL) received by PID 6588
============================================================
""".replace("<SP>", " ")
SIGNAL_EXCEPTION = """Traceback (most recent call last):
  File "/site-packages/torch/distributed/elastic/agent/server/api.py", line 923, in _invoke_run
    time.sleep(monitor_interval)
  File "/site-packages/torch/distributed/elastic/multiprocessing/api.py", line 86, in _terminate_process_handler
    raise SignalException(f"Process {os.getpid()} got signal: {sigval}", sigval=sigval)
torch.distributed.elastic.multiprocessing.api.SignalException: Process 7334 got signal: 15
"""
CHAINED = """[rank0]: Traceback (most recent call last):
[rank0]:   File "x.py", line 1, in <module>
[rank0]: ValueError: first

During handling of the above exception, another exception occurred:

[rank0]: Traceback (most recent call last):
[rank0]:   File "x.py", line 3, in <module>
[rank0]: RuntimeError: second
"""


def shown(text: str) -> list[str]:
    noise = Noise()
    return [line.rstrip("\n") for line in lines_of(text) if not noise(line)]


def test_torchruns_own_report_is_held_back_and_the_runs_lines_pass():
    r = [line + "\n" for line in RUN]
    text = OMP + r[0] + r[1] + SIGTERM + r[2] + CPP + r[3] + CHILD_FAILED + r[4] + SIGNAL_EXCEPTION + CHAINED + r[1]
    assert shown(text) == [*RUN, RUN[1]]
    assert shown("".join(r)) == RUN  # nothing of a run is held back
    # a progress bar redraws its line with carriage returns: each redraw passes as it comes
    assert lines_of("step 1 |#  |\rstep 2 |## |\rstep 3 |###|\n") == ["step 1 |#  |\r", "step 2 |## |\r",
                                                                       "step 3 |###|\n"]
    assert lines_of("done\npartial") == ["done\n", "partial"]


def test_the_follower_shows_the_run_until_every_writer_closed_the_log(tmp_path):
    """As exec_torchrun hands it over: the log's shared lock taken, the writer (torchrun) holds the file, and an
    orphan it leaves behind (a worker whose agent was killed) writes its line after the writer is gone."""
    log = tmp_path / "torchrun.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    script = ("import subprocess, sys\n"
              f"print({RUN[1]!r}, flush=True)\n"
              f"sys.stdout.write({CHILD_FAILED!r}); sys.stdout.flush()\n"
              "orphan = 'import sys, time; time.sleep(1.5); print(sys.argv[1], flush=True)'\n"
              f"subprocess.Popen([sys.executable, '-c', orphan, {RUN[3]!r}])\n")  # it inherits the log as stdout
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=fd, stderr=subprocess.STDOUT)
    os.close(fd)
    out: list[str] = []
    t0 = time.monotonic()
    follow(log, out.append, os.getppid(), poll=0.05)
    assert writer.wait(timeout=10) == 0
    assert time.monotonic() - t0 >= 1.2  # it waited for the orphan
    assert "".join(out) == (f"{RUN[1]}\n{RUN[3]}\nfsdptrain-launch: torchrun's own report (tracebacks, exit codes, "
                            f"C++ warnings) is left out here; the full output is in {log}\n")
    assert CHILD_FAILED in log.read_text()  # all of it is in the log


def test_the_heartbeat_probe_sees_the_store_go_without_a_store_call(monkeypatch):
    import torch.distributed as dist

    from fsdptrain.dist.distributed import PeerStop, open_probe

    server = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=10))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    peers = PeerStop(0, 2)
    peers.probe = open_probe()
    assert peers.probe is not None and not peers.store_closed()
    server.set("k", "v")  # the store answers while the probe is open
    assert server.get("k") == b"v" and not peers.store_closed()
    del server  # torchrun's agent killed: its store's sockets close
    deadline = time.monotonic() + 5
    while not peers.store_closed():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert peers.dead_ranks() == []  # no group: nothing to ask (and with one, None: the store is gone)
    peers.close()
    assert peers.probe is None
    monkeypatch.setenv("MASTER_PORT", "1")  # nothing listens there: no probe, the heartbeat as before
    assert open_probe() is None


def test_closing_the_watch_waits_for_a_tick_in_flight():
    """The watchdog's tick may be inside a store call when the run ends; close() must wait for it, or the
    interpreter finalizes under a daemon thread in C++ and the finished rank aborts (SIGABRT, seen twice in CI)."""
    import threading

    from fsdptrain.dist.distributed import PeerStop

    peers = PeerStop(0, 2)
    ended = threading.Event()

    def slow_tick() -> None:
        time.sleep(0.5)  # a store call in flight
        ended.set()

    peers._watch = threading.Thread(target=slow_tick, daemon=True)
    peers._watch.start()
    peers.close()
    assert ended.is_set()
