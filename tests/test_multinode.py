"""launch/torchrun.sh: resolved commands, rendezvous failures, and a real run across two network namespaces.

The two-host test makes two network namespaces joined by a veth pair, each with
its own address in a private range that exists only inside them (nothing else
is ever addressed), and its own host name (a UTS namespace). It needs root and
iproute2; elsewhere it skips and says why. Failure cases that need no second
host run on loopback addresses.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from fsdptrain.config.schema import TrainConfig
from fsdptrain.core.errors import LaunchError
from fsdptrain.launch import interface_env, read_plan, route_to, torchrun_command
from tests.helpers import REPO, env, free_port, hung_report, log_tails, read_metrics

pytestmark = pytest.mark.slow  # see docs/testing.md: the quick loop is -m "not slow"

LAUNCH = str(REPO / "launch" / "torchrun.sh")
DEMO = ["train.max_steps=3", "data.synthetic_examples=64", "train.micro_batch_size=4", "logging.log_every=1",
        "logging.tensorboard=false", "logging.progress=lines"]
PREFIX = "fsdpt-"  # namespaces and links this test owns


# ----------------------------------------------------------------------------- command building (no processes)


def test_static_command_from_llamafactory_variables():
    plan = read_plan({"NNODES": "2", "NODE_RANK": "1", "NPROC_PER_NODE": "8", "MASTER_ADDR": "10.1.2.3",
                      "MASTER_PORT": "29555", "RDZV_TIMEOUT": "120"})
    cmd = torchrun_command(plan, ["cfg.yaml", "train.lr=1e-4"], "10.1.2.4", python="python")
    assert cmd == ["python", "-m", "torch.distributed.run", "--nproc-per-node", "8", "--nnodes", "2",
                   "--node-rank", "1", "--master-addr", "10.1.2.3", "--master-port", "29555",
                   "--rdzv-conf", "timeout=120", "-m", "fsdptrain", "train", "cfg.yaml", "train.lr=1e-4"]


def test_elastic_command_sets_is_host_and_local_addr():
    base = {"NNODES": "2", "MASTER_ADDR": "10.1.2.3", "RDZV_ID": "job7", "MIN_NNODES": "1", "MAX_NNODES": "4",
            "NPROC_PER_NODE": "2"}
    host = torchrun_command(read_plan({**base, "NODE_RANK": "0"}), [], "10.1.2.3", python="python")
    other = torchrun_command(read_plan({**base, "NODE_RANK": "1"}), [], "10.1.2.9", python="python")
    assert host[host.index("--nnodes") + 1] == "1:4"
    assert host[host.index("--rdzv-endpoint") + 1] == "10.1.2.3:29500"
    assert host[host.index("--rdzv-conf") + 1] == "is_host=true,join_timeout=300"
    assert other[other.index("--rdzv-conf") + 1] == "is_host=false,join_timeout=300"
    assert other[other.index("--local-addr") + 1] == "10.1.2.9"
    assert other[other.index("--max-restarts") + 1] == "3"
    assert "--node-rank" not in other


def test_bad_launch_variables_are_one_line_errors():
    with pytest.raises(LaunchError, match=r"^NODE_RANK=2 but NNODES=2: node ranks run from 0 to 1$"):
        read_plan({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "10.0.0.1"})
    with pytest.raises(LaunchError, match=r"^MASTER_ADDR is not set: set it on every node to node 0's address"):
        read_plan({"NNODES": "2", "NODE_RANK": "1"})
    with pytest.raises(LaunchError, match=r"^NNODES='two' is not an integer$"):
        read_plan({"NNODES": "two"})
    plan = read_plan({"CUDA_VISIBLE_DEVICES": ""})  # no GPUs: one CPU process, a free local port
    assert (plan.nproc, plan.nnodes, plan.master_addr) == (1, 1, "127.0.0.1")
    assert read_plan({"CUDA_VISIBLE_DEVICES": "0,3,5"}).nproc == 3


def test_interface_selection():
    assert route_to("127.0.0.1") == ("127.0.0.1", "lo")
    two = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1"}
    assert interface_env(read_plan(two), {}, "127.0.0.1", "lo")[0] == {"GLOO_SOCKET_IFNAME": "lo",
                                                                        "NCCL_SOCKET_IFNAME": "lo"}
    # the user's choice wins
    assert interface_env(read_plan(two), {"NCCL_SOCKET_IFNAME": "ib0"}, "10.0.0.1", "eth0")[0] == {
        "GLOO_SOCKET_IFNAME": "eth0"}
    # a host name that resolves to loopback on this node: binding gloo to lo would strand the other nodes
    named = read_plan({**two, "MASTER_ADDR": "node0.example"})
    set_env, notes = interface_env(named, {}, "127.0.1.1", "lo")
    assert set_env == {} and notes[0].startswith("MASTER_ADDR=node0.example resolves to the loopback 127.0.1.1 here")
    assert interface_env(read_plan({}), {}, "127.0.0.1", "lo") == ({}, [])  # one node: leave them alone


# ----------------------------------------------------------------------------- failures on loopback


def launch(extra: dict, args: list[str] = (), cwd: Path | None = None, wrap: list[str] = ()) -> subprocess.Popen:
    e = env(**extra)
    e.pop("WORLD_SIZE", None)
    e.pop("RANK", None)
    return subprocess.Popen([*wrap, "bash", LAUNCH, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=e, cwd=cwd, start_new_session=True)


def finish(p: subprocess.Popen, timeout: float, others: tuple[subprocess.Popen, ...] = ()) -> tuple[int, str]:
    """`p`'s exit status and output. When it does not end within `timeout`, the failure shows what it and the
    launches in `others` (the other nodes of the same run) were doing: their outputs, the stacks of their
    processes (hung_report) and the ends of their log files."""
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        launches = [p, *others]
        marks = [next((a for a in q.args if a.startswith("output_dir=")), "\0") for q in launches]
        stacks = hung_report(marks)
        outs = []
        for q in launches:
            os.killpg(q.pid, signal.SIGKILL)  # the launcher, torchrun and the follower: this test started them
            outs.append(q.communicate()[0])
        shown = "\n".join(f"--- output of launch {i}:\n{o[-3000:]}\n"
                           f"{log_tails(o)}" for i, (q, o) in enumerate(zip(launches, outs)))
        pytest.fail(f"launch did not finish within {timeout} s; {stacks}\n{shown}")
    return p.returncode, out


def error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("fsdptrain: error:")]


def test_port_in_use_is_reported_at_once():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.monotonic()
        rc, out = finish(launch({"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                                 "MASTER_PORT": str(port)}), 30)
    assert rc == 2 and time.monotonic() - t0 < 10
    assert error_lines(out) == [
        f"fsdptrain: error: [node 0] port {port} is already in use on this host ({socket.gethostname()}), so the "
        f"rendezvous at 127.0.0.1:{port} cannot start (Address already in use); stop what holds it (`ss -ltnp | "
        f"grep :{port}`: an earlier run?) or set another MASTER_PORT on every node"]


def test_mismatched_nnodes_stops_both_nodes():
    port = str(free_port())
    common = {"NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RDZV_TIMEOUT": "20"}
    node0 = launch({**common, "NNODES": "2"})
    node1 = launch({**common, "NNODES": "3", "NODE_RANK": "1"})
    (rc0, out0), (rc1, out1) = finish(node0, 40), finish(node1, 40)
    host = socket.gethostname()
    problem = (f"NNODES differs between nodes: node 0 ({host}) has NNODES=2, node 1 ({host}) has NNODES=3; "
               "set the same NNODES on every node")
    assert (rc0, rc1) == (2, 2)
    assert error_lines(out0) == [f"fsdptrain: error: [node 0] {problem}"]
    assert error_lines(out1) == [f"fsdptrain: error: [node 1] node 0 at 127.0.0.1:{port} refused this node: {problem}"]


def test_wrong_master_port_and_missing_node_time_out_with_one_line():
    # (on loopback every 127.x address reaches node 0, so the wrong endpoint here is the port;
    # the two-host test below uses a wrong address)
    port, wrong = str(free_port()), str(free_port())
    t0 = time.monotonic()
    node0 = launch({"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                    "RDZV_TIMEOUT": "3"})
    node1 = launch({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": wrong,
                    "RDZV_TIMEOUT": "3"})
    (rc0, out0), (rc1, out1) = finish(node0, 30), finish(node1, 30)
    assert (rc0, rc1) == (2, 2) and time.monotonic() - t0 < 15
    assert error_lines(out0) == [
        f"fsdptrain: error: [node 0] node(s) 1 of 2 did not join the rendezvous at 127.0.0.1:{port} within 3 s "
        f"(RDZV_TIMEOUT); on those nodes check that the launch was started with MASTER_ADDR=127.0.0.1 "
        f"MASTER_PORT={port} NNODES=2, that they reach this address (`nc -zv 127.0.0.1 {port}` from there) and "
        "that no firewall blocks the port"]
    assert error_lines(out1) == [
        f"fsdptrain: error: [node 1] could not reach node 0's rendezvous at 127.0.0.1:{wrong} (this host reaches it "
        "from 127.0.0.1 on lo) within 3 s (RDZV_TIMEOUT), last error: Connection refused; check that MASTER_ADDR is "
        f"node 0's address as seen from this host, that node 0 was started with MASTER_PORT={wrong}, and that no "
        "firewall blocks the port"]


def test_unresolvable_master_addr():
    rc, out = finish(launch({"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1.invalid"}), 30)
    assert rc == 2
    assert error_lines(out)[0].startswith("fsdptrain: error: MASTER_ADDR=127.0.0.1.invalid: "
                                          "cannot resolve this host name")


# ----------------------------------------------------------------------------- two hosts in network namespaces


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def netns_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "needs iproute2 (`apt-get install -y iproute2`)"
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    probe = f"{PREFIX}probe-{os.getpid()}"
    try:  # everything the fixture does: a namespace, a veth pair in it, running a command inside
        _ip("netns", "add", probe)
        _ip("-n", probe, "link", "add", "fvprobea", "type", "veth", "peer", "name", "fvprobeb")
        subprocess.run(["ip", "netns", "exec", probe, "true"], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        return f"cannot create network namespaces and veth pairs here: {(e.stderr or '').strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _remove_stale() -> None:
    """Namespaces left by a killed earlier run of this test (their pid is gone)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        parts = name.split("-")
        if (name.startswith(PREFIX) and len(parts) == 4 and parts[1].isdigit()
                and not Path(f"/proc/{parts[1]}").exists()):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@dataclass
class Hosts:
    ns: list[str]
    addr: list[str]
    unused: str  # an address in the namespaces' subnet that no one holds
    names: list[str]

    def wrap(self, i: int) -> list[str]:
        """Run a command on host i: its network namespace and its own host name."""
        inner = ["ip", "netns", "exec", self.ns[i]]
        if shutil.which("unshare"):
            return [*inner, "unshare", "--uts", "sh", "-c", f'hostname {self.names[i]} && exec "$@"', "sh"]
        return inner


@pytest.fixture
def two_hosts():
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    _remove_stale()
    tag = f"{os.getpid()}-{random.randrange(16**4):04x}"
    ns = [f"{PREFIX}{tag}-0", f"{PREFIX}{tag}-1"]
    veth = [f"fv{tag.replace('-', '')[-9:]}a", f"fv{tag.replace('-', '')[-9:]}b"]
    net = f"10.{random.randrange(200, 250)}.{random.randrange(1, 250)}"  # private; exists only in the namespaces
    hosts = Hosts(ns, [f"{net}.1", f"{net}.2"], f"{net}.3", ["fsdpt-node0", "fsdpt-node1"])
    try:
        for n in ns:
            _ip("netns", "add", n)
        _ip("link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for n, v, a in zip(ns, veth, hosts.addr):
            _ip("link", "set", v, "netns", n)
            _ip("-n", n, "addr", "add", f"{a}/24", "dev", v)
            _ip("-n", n, "link", "set", v, "up")
            _ip("-n", n, "link", "set", "lo", "up")
        yield hosts
    finally:
        for n in ns:  # deleting a namespace deletes its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
        subprocess.run(["ip", "link", "del", veth[0]], capture_output=True)  # if it never moved


def test_two_hosts_train_like_one_host_and_fail_loudly(two_hosts, tmp_path):
    h = two_hosts
    # one host, two processes (what the two-host run must reproduce), run alongside the two hosts
    single = launch({"NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())},
                    [*DEMO, f"output_dir={tmp_path / 'single'}"], cwd=tmp_path)
    common = {"NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": h.addr[0], "MASTER_PORT": "29500",
              "RDZV_TIMEOUT": "60"}
    args = [*DEMO, f"output_dir={tmp_path / 'two'}"]
    procs = [launch({**common, "NODE_RANK": str(i)}, args, cwd=tmp_path, wrap=h.wrap(i)) for i in range(2)]
    rc, out_single = finish(single, 240)
    assert rc == 0, out_single[-3000:]
    results = [finish(p, 240, tuple(q for q in procs if q is not p)) for p in procs]
    for i, (rc, out) in enumerate(results):
        assert rc == 0, f"node {i}:\n{out[-3000:]}"
        print(f"--- node {i}\n{out}")
    log0, log1 = results[0][1], results[1][1]

    single_losses = [m["loss"] for m in read_metrics(tmp_path / "single")]
    two_losses = [m["loss"] for m in read_metrics(tmp_path / "two")]
    assert len(two_losses) == 3
    assert two_losses == single_losses

    # each host's log holds its own ranks, its host name, and the interface it was given
    assert f"fsdptrain: rank 0/2 (local rank 0/1, node 0) on host fsdpt-node0 joined {h.addr[0]}:29500" in log0
    assert f"fsdptrain: rank 1/2 (local rank 0/1, node 1) on host fsdpt-node1 joined {h.addr[0]}:29500" in log1
    assert "rank 1/2" not in log0 and "rank 0/2" not in log1
    assert "fsdptrain-launch: all 2 nodes joined" in log0 and f"node 1 fsdpt-node1 ({h.addr[1]})" in log0
    for log, addr in ((log0, h.addr[0]), (log1, h.addr[1])):
        assert f"local address {addr} on fv" in log
        assert "GLOO_SOCKET_IFNAME=fv" in log and "torch.distributed.run --nproc-per-node 1 --nnodes 2" in log

    # node 0 given another host's address: it cannot host the rendezvous there
    rc, out = finish(launch({**common, "NODE_RANK": "0", "MASTER_ADDR": h.addr[1]}, args, wrap=h.wrap(0)), 30)
    assert rc == 2 and error_lines(out) == [
        f"fsdptrain: error: [node 0] MASTER_ADDR={h.addr[1]} ({h.addr[1]}) is not an address of this host "
        "(fsdpt-node0), but node 0 hosts the rendezvous there; set MASTER_ADDR to node 0's own address on every "
        "node (`hostname -I` on node 0), or run this with NODE_RANK other than 0"]

    # wrong MASTER_ADDR on node 1: node 1 cannot reach it, node 0 waits for node 1 in vain; both say so
    t0 = time.monotonic()
    bad = {**common, "RDZV_TIMEOUT": "4"}
    procs = [launch({**bad, "NODE_RANK": "0"}, args, cwd=tmp_path, wrap=h.wrap(0)),
             launch({**bad, "NODE_RANK": "1", "MASTER_ADDR": h.unused}, args, cwd=tmp_path, wrap=h.wrap(1))]
    (rc0, out0), (rc1, out1) = [finish(p, 60) for p in procs]
    assert (rc0, rc1) == (2, 2) and time.monotonic() - t0 < 20
    [err0], [err1] = error_lines(out0), error_lines(out1)
    assert err0.startswith("fsdptrain: error: [node 0] node(s) 1 of 2 did not join the rendezvous at "
                           f"{h.addr[0]}:29500 within 4 s (RDZV_TIMEOUT)")
    assert err1.startswith(f"fsdptrain: error: [node 1] could not reach node 0's rendezvous at {h.unused}:29500 "
                           f"(this host reaches it from {h.addr[1]} on fv"), err1
    assert "within 4 s (RDZV_TIMEOUT), last error: " in err1 and "check that MASTER_ADDR is node 0's address" in err1


def test_two_hosts_without_a_shared_output_dir_stop_before_training(two_hosts, tmp_path):
    """Each node in its own working folder: a relative output_dir is a different folder on each node, and
    checkpoints (every rank writes shards, rank 0 seals them) would fail at the first save. Both nodes stop at
    start with one line."""
    h = two_hosts
    common = {"NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": h.addr[0], "MASTER_PORT": "29500",
              "RDZV_TIMEOUT": "60"}
    dirs = [tmp_path / "node0", tmp_path / "node1"]
    for d in dirs:
        d.mkdir()
    procs = [launch({**common, "NODE_RANK": str(i)}, [*DEMO, "output_dir=run"], cwd=dirs[i], wrap=h.wrap(i))
             for i in range(2)]
    results = [finish(p, 120) for p in procs]
    for i, (rc, out) in enumerate(results):
        assert rc != 0, f"node {i} trained:\n{out[-3000:]}"
        errors = error_lines(out)
        assert len(errors) == 1, f"node {i}:\n{out[-3000:]}"
        assert "output_dir: run is not shared by all nodes: rank(s) 1 on host(s) fsdpt-node1 do not see the file " \
               "rank 0 wrote there" in errors[0], errors[0]
        assert "Traceback" not in out.split("fsdptrain: error:")[0]
    assert not (dirs[0] / "run" / "metrics.jsonl").exists() and not (dirs[0] / "run" / "config.yaml").exists()
    assert not (dirs[1] / "run").exists()


SLOW = pytest.mark.skipif(not os.environ.get("FSDPTRAIN_SLOW_MULTINODE"),
                          reason="slower two-host variant (20-60 s): set FSDPTRAIN_SLOW_MULTINODE=1")


@SLOW
def test_two_hosts_elastic_c10d_rendezvous(two_hosts, tmp_path):
    h = two_hosts
    common = {"NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": h.addr[0], "RDZV_ID": "job1", "RDZV_TIMEOUT": "60"}
    args = [*DEMO, f"output_dir={tmp_path / 'elastic'}"]
    procs = [launch({**common, "NODE_RANK": str(i)}, args, cwd=tmp_path, wrap=h.wrap(i)) for i in range(2)]
    results = [finish(p, 240, tuple(q for q in procs if q is not p)) for p in procs]
    for i, (rc, out) in enumerate(results):
        assert rc == 0, f"node {i}:\n{out[-3000:]}"
        assert f"--rdzv-conf is_host={'true' if i == 0 else 'false'},join_timeout=60 --local-addr {h.addr[i]}" in out
    logs = "".join(out for _, out in results)
    # c10d may give global rank 0 to either node; whichever has it writes the metrics
    assert "rank 0/2" in logs and "rank 1/2" in logs
    assert len(read_metrics(tmp_path / "elastic")) == 3


@SLOW
def test_two_hosts_hybrid_2x2_equals_one_host_full_sharding(two_hosts, tmp_path):
    h = two_hosts
    one = launch({"NPROC_PER_NODE": "4", "MASTER_PORT": str(free_port())}, [*DEMO, f"output_dir={tmp_path / 'one'}"],
                 cwd=tmp_path)
    rc, out = finish(one, 300)
    assert rc == 0, out[-3000:]
    common = {"NNODES": "2", "NPROC_PER_NODE": "2", "MASTER_ADDR": h.addr[0], "RDZV_TIMEOUT": "60"}
    args = [*DEMO, f"output_dir={tmp_path / 'two'}", "parallel.sharding=hybrid"]
    procs = [launch({**common, "NODE_RANK": str(i)}, args, cwd=tmp_path, wrap=h.wrap(i)) for i in range(2)]
    results = [finish(p, 300) for p in procs]
    for i, (rc, out) in enumerate(results):
        assert rc == 0, f"node {i}:\n{out[-3000:]}"
    assert "mesh replicate 2 x shard 2" in results[0][1]  # shard groups = the two hosts' own ranks
    assert [m["loss"] for m in read_metrics(tmp_path / "two")] == [m["loss"] for m in read_metrics(tmp_path / "one")]


# Simulated Slurm for launch/slurm.sbatch: `srun` runs the job step once per node, each node being one of the two
# namespace hosts (node<N>.sh wraps a command into host N); `scontrol show hostnames` lists their names.
FAKE_SRUN = r"""#!/usr/bin/env bash
set -u
if [[ "$*" == *"hostname -I" ]]; then  # srun --nodes=1 --ntasks=1 -w HEAD hostname -I: the head node's addresses
    exec "$FAKE_SLURM/node0.sh" hostname -I
fi
while [[ $# -gt 0 && "$1" == --* ]]; do shift; done  # --kill-on-bad-exit=1 --label --ntasks-per-node=1
pids=()
for ((n = 0; n < SLURM_JOB_NUM_NODES; n++)); do
    SLURM_NODEID=$n SLURM_PROCID=$n "$FAKE_SLURM/node$n.sh" "$@" > "$FAKE_SLURM/node$n.log" 2>&1 &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""


def test_slurm_script_trains_across_two_hosts_like_one_host(two_hosts, tmp_path):
    h = two_hosts
    fake = tmp_path / "slurm"
    fake.mkdir()
    (fake / "srun").write_text(FAKE_SRUN)
    (fake / "scontrol").write_text("#!/bin/sh\n[ \"$1 $2\" = \"show hostnames\" ] && printf '%s\\n' "
                                   + " ".join(h.names) + "\n")
    for i in range(2):
        (fake / f"node{i}.sh").write_text(f'#!/bin/sh\nexec {shlex.join(h.wrap(i))} "$@"\n')
    for f in fake.iterdir():
        f.chmod(0o755)
    single = launch({"NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())},
                    [*DEMO, f"output_dir={tmp_path / 'single'}"], cwd=tmp_path)
    e = env(PATH=f"{fake}:{os.environ['PATH']}", FAKE_SLURM=str(fake), SLURM_JOB_ID="42",
            SLURM_JOB_NODELIST="fsdpt-node[0-1]", SLURM_JOB_NUM_NODES="2", NPROC_PER_NODE="1", RDZV_TIMEOUT="60")
    for key in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(key, None)
    job = subprocess.Popen(["bash", str(REPO / "launch" / "slurm.sbatch"), *DEMO,
                            f"output_dir={tmp_path / 'slurm_run'}"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=e, cwd=REPO,
                           start_new_session=True)
    rc, out = finish(single, 240)
    assert rc == 0, out[-3000:]
    rc, out = finish(job, 240)
    logs = [(fake / f"node{i}.log").read_text() for i in range(2)]
    assert rc == 0, out + "\n".join(log[-3000:] for log in logs)
    # node 0's address came from `hostname -I` on the head node; SLURM_NODEID became NODE_RANK
    assert f"fsdptrain slurm: job 42, nodes fsdpt-node[0-1], MASTER_ADDR={h.addr[0]}:29500" in out
    for i in range(2):
        assert f"rank {i}/2 (local rank 0/1, node {i}) on host {h.names[i]} joined {h.addr[0]}:29500" in logs[i]
    assert [m["loss"] for m in read_metrics(tmp_path / "slurm_run")] == \
        [m["loss"] for m in read_metrics(tmp_path / "single")]


def test_slurm_time_limit_signal_saves_stops_and_requeues_then_the_requeued_job_resumes(two_hosts, tmp_path):
    """--signal=B:USR1@300: the batch script passes USR1 to every rank (scancel --signal), torchrun's agent
    ignores it, the ranks save and stop at the next step boundary, rank 0 writes FSDPTRAIN_STOP_FILE and the
    script requeues the job; the requeued job resumes from that checkpoint and finishes."""
    h = two_hosts
    fake = tmp_path / "slurm"
    fake.mkdir()
    (fake / "srun").write_text(FAKE_SRUN)
    (fake / "scontrol").write_text("#!/bin/sh\n[ \"$1 $2\" = \"show hostnames\" ] && printf '%s\\n' "
                                   + " ".join(h.names) + "\n"
                                   + f'[ "$1" = requeue ] && echo "$2" >> {fake}/requeued\nexit 0\n')
    run = tmp_path / "slurm_run"
    # only this job's processes: another test's fsdptrain may be running beside this one (pytest-xdist)
    (fake / "scancel").write_text('#!/bin/sh\n[ "$1" = --signal=USR1 ] && '
                                  f'pkill -USR1 -f -- "-m fsdptrain train .*output_dir={run}"\nexit 0\n')
    for i in range(2):
        (fake / f"node{i}.sh").write_text(f'#!/bin/sh\nexec {shlex.join(h.wrap(i))} "$@"\n')
    for f in fake.iterdir():
        f.chmod(0o755)
    e = env(PATH=f"{fake}:{os.environ['PATH']}", FAKE_SLURM=str(fake), SLURM_JOB_ID="43",
            SLURM_JOB_NODELIST="fsdpt-node[0-1]", SLURM_JOB_NUM_NODES="2", NPROC_PER_NODE="1", RDZV_TIMEOUT="60",
            FSDPTRAIN_STOP_FILE=str(tmp_path / "stopped"))
    for key in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(key, None)
    args = ["train.max_steps=400", *DEMO[1:], f"output_dir={run}"]
    job = subprocess.Popen(["bash", str(REPO / "launch" / "slurm.sbatch"), *args], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env=e, cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0][-3000:]
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # what Slurm sends the batch shell 300 s before the limit
    rc, out = finish(job, 120)
    logs = [(fake / f"node{i}.log").read_text() for i in range(2)]
    assert rc == 0, out + "\n".join(log[-3000:] for log in logs)
    assert "fsdptrain slurm: time limit near (SIGUSR1): every rank saves a checkpoint and stops" in out
    assert "fsdptrain slurm: stopped by SIGUSR1 at step " in out, out
    step = int(out.split("stopped by SIGUSR1 at step ")[1].split(";")[0])
    assert step < 400 and (run / "checkpoints" / f"step-{step:08d}" / "COMPLETE.json").is_file()
    assert (fake / "requeued").read_text() == "43\n"
    assert "fsdptrain slurm: requeueing job 43; it resumes from that checkpoint" in out

    # the requeued job: the same script, the same arguments
    e["SLURM_RESTART_COUNT"] = "1"
    job = subprocess.Popen(["bash", str(REPO / "launch" / "slurm.sbatch"), *args[:1], "train.max_steps=30",
                            *args[1:]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=e,
                           cwd=REPO, start_new_session=True)
    rc, out = finish(job, 240)
    log0 = (fake / "node0.log").read_text()
    assert rc == 0, out + log0[-3000:]
    assert f"resumed from {run}/checkpoints/step-{step:08d}" in log0
    assert [m["step"] for m in read_metrics(run)] == list(range(1, 31))


def test_config_mistake_stops_the_launch_before_any_process_starts(tmp_path):
    t0 = time.monotonic()
    rc, out = finish(launch({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
                            ["train.lerning_rate=1"]), 30)
    assert rc == 2 and time.monotonic() - t0 < 10
    keys = ", ".join(f.name for f in dataclasses.fields(TrainConfig))  # the section's keys, in declaration order
    assert keys.startswith("max_steps, epochs, micro_batch_size, grad_accum_steps, lr, schedule, ")
    assert error_lines(out) == [
        "fsdptrain: error: override 'train.lerning_rate=1': unknown key 'train.lerning_rate'; did you mean "
        f"'train.lr'? (keys in 'train': {keys})"]
    assert "torch.distributed.run" not in out  # torchrun never started
