"""Multi-node launch: build the torchrun command from LLaMA-Factory-style variables and check the rendezvous first.

`launch/torchrun.sh` runs `python -m fsdptrain.launch [CONFIG] [key=value ...]`, which
  1. reads NNODES, NODE_RANK, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT (and for
     elastic runs RDZV_ID, MIN_NNODES, MAX_NNODES, MAX_RESTARTS) and RDZV_TIMEOUT;
  2. finds the interface and source address this node uses to reach
     MASTER_ADDR and sets GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME to it when
     unset (otherwise gloo resolves the host name, often to 127.0.0.1);
  3. runs a pre-flight rendezvous of its own on MASTER_ADDR:MASTER_PORT before
     torchrun starts: node 0 listens, every other node connects and says who it
     is; node 0 checks NNODES, NODE_RANK and NPROC_PER_NODE agree and answers.
     A node that never joins, an unreachable or wrong MASTER_ADDR, a port in
     use or mismatched settings end every waiting node with one line naming
     the address, port and what to check, within RDZV_TIMEOUT seconds, instead
     of torchrun hanging (its own static rendezvous waits 10 minutes and then
     prints a traceback). The port is released before torchrun binds it.
  4. prints the resolved command and execs torchrun (as `python -m
     torch.distributed.run`, the same interpreter) with `-m fsdptrain train ...`,
     its output going to a log file and shown here without torchrun's own
     report of failures (launchlog.py; FSDPTRAIN_LAUNCH_LOG=0: as it is).
This module imports no torch, so the check costs well under a second.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

from . import launchlog
from .core import log
from .core.errors import LaunchError, UserError

PREFIX = "fsdptrain-launch"
HELLO_KEY = "fsdptrain_rendezvous"


@dataclass
class Plan:
    nnodes: int
    node_rank: int
    nproc: int
    master_addr: str
    master_port: int
    timeout_s: float
    rdzv_id: Optional[str] = None  # set: elastic run through torchrun's c10d rendezvous
    min_nnodes: int = 1
    max_nnodes: int = 1
    max_restarts: Optional[int] = None

    @property
    def elastic(self) -> bool:
        return self.rdzv_id is not None

    @property
    def multi_node(self) -> bool:
        return self.max_nnodes > 1


# ----------------------------------------------------------------------------- reading the environment


def _int(env: Mapping[str, str], name: str, default: Optional[int], lo: int = 0) -> int:
    text = env.get(name, "").strip()
    if not text:
        if default is None:
            raise LaunchError(f"{name} is not set; export it on every node (see docs/multi-node.md)")
        return default
    try:
        value = int(text)
    except ValueError:
        raise LaunchError(f"{name}={text!r} is not an integer") from None
    if value < lo:
        raise LaunchError(f"{name}={value} must be at least {lo}")
    return value


def visible_gpus(env: Mapping[str, str]) -> int:
    """GPUs this node would use, without importing torch: CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`."""
    if "CUDA_VISIBLE_DEVICES" in env:
        return len([d for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() and d.strip() != "-1"])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU ")) if out.returncode == 0 else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_plan(env: Mapping[str, str]) -> Plan:
    nnodes = _int(env, "NNODES", 1, lo=1)
    node_rank = _int(env, "NODE_RANK", 0)
    nproc = _int(env, "NPROC_PER_NODE", None if env.get("NPROC_PER_NODE", "").strip() else max(1, visible_gpus(env)),
                 lo=1)
    timeout = float(_int(env, "RDZV_TIMEOUT", 300, lo=1))
    rdzv_id = env.get("RDZV_ID", "").strip() or None
    min_n = _int(env, "MIN_NNODES", nnodes, lo=1) if rdzv_id else nnodes
    max_n = _int(env, "MAX_NNODES", max(nnodes, min_n), lo=1) if rdzv_id else nnodes
    if min_n > max_n:
        raise LaunchError(f"MIN_NNODES={min_n} is above MAX_NNODES={max_n}")
    if not rdzv_id and node_rank >= nnodes:
        raise LaunchError(f"NODE_RANK={node_rank} but NNODES={nnodes}: node ranks run from 0 to {nnodes - 1}")
    addr = env.get("MASTER_ADDR", "").strip()
    if not addr:
        if max_n > 1:
            raise LaunchError("MASTER_ADDR is not set: set it on every node to node 0's address "
                              "(one the other nodes can reach, e.g. from `hostname -I` on node 0)")
        addr = "127.0.0.1"
    port_default = free_port() if max_n == 1 else 29500  # nodes must agree: no random port across nodes
    port = _int(env, "MASTER_PORT", port_default, lo=1)
    if port > 65535:
        raise LaunchError(f"MASTER_PORT={port} is not a TCP port (1-65535)")
    restarts = None  # static runs: torchrun's default (no restarts) unless asked
    if rdzv_id or env.get("MAX_RESTARTS", "").strip():
        restarts = _int(env, "MAX_RESTARTS", 3, lo=0)
    return Plan(nnodes, node_rank, nproc, addr, port, timeout, rdzv_id, min_n, max_n, restarts)


# ----------------------------------------------------------------------------- addresses and interfaces


def resolve(addr: str) -> str:
    """MASTER_ADDR as an IP address (IPv4 preferred, as torch's TCPStore tries)."""
    try:
        infos = socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise LaunchError(f"MASTER_ADDR={addr}: cannot resolve this host name here ({e.strerror}); "
                          "use node 0's IP address or fix DNS / /etc/hosts on this node") from None
    infos.sort(key=lambda i: i[0] != socket.AF_INET)
    return infos[0][4][0]


def _ipv4_of_interface(name: str) -> Optional[str]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:  # SIOCGIFADDR
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def interface_of(local_ip: str) -> Optional[str]:
    """The network interface that holds `local_ip` (IPv4), or None."""
    for _, name in socket.if_nameindex():
        if _ipv4_of_interface(name) == local_ip:
            return name
    return None


def route_to(ip: str) -> tuple[Optional[str], Optional[str]]:
    """(source address, interface) this host uses to reach `ip`. A UDP connect sends nothing."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((ip, 9))
        except OSError:
            return None, None
        src = s.getsockname()[0]
    return src, interface_of(src) if family == socket.AF_INET else None


def is_local_address(ip: str) -> bool:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, 0))
        except OSError:
            return False
    return True


def interface_env(plan: Plan, env: Mapping[str, str], ip: str, ifname: Optional[str]) -> tuple[dict, list[str]]:
    """GLOO/NCCL_SOCKET_IFNAME to set (only where unset) and notes for the log."""
    if not plan.multi_node:
        return {}, []
    if ifname is None:
        return {}, [f"no interface found for the route to {ip}; set GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME yourself"]
    if ifname == "lo" and not (_is_ip(plan.master_addr) and ipaddress.ip_address(plan.master_addr).is_loopback):
        # a host name that resolves to loopback here (Debian's 127.0.1.1): binding gloo to lo would strand us
        return {}, [f"MASTER_ADDR={plan.master_addr} resolves to the loopback {ip} here; other nodes cannot reach "
                    "that: use node 0's real IP address, or set GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME"]
    out = {k: ifname for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if not env.get(k)}
    notes = ([" ".join(f"{k}={v}" for k, v in out.items()) + " (the interface of the route to MASTER_ADDR)"]
             if out else [])
    return out, notes


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------- the torchrun command


def torchrun_command(plan: Plan, args: list[str], local_addr: Optional[str], python: str = sys.executable,
                     extra: Optional[list[str]] = None) -> list[str]:
    cmd = [python, "-m", "torch.distributed.run", "--nproc-per-node", str(plan.nproc)]
    if plan.elastic:
        is_host = "true" if plan.node_rank == 0 else "false"
        cmd += ["--nnodes", f"{plan.min_nnodes}:{plan.max_nnodes}", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"{_host_port(plan.master_addr, plan.master_port)}", "--rdzv-id", plan.rdzv_id,
                # c10d pitfalls: say who hosts the store, and advertise the address peers can reach
                # (the default is the host name, which may resolve to localhost and hang the workers)
                "--rdzv-conf", f"is_host={is_host},join_timeout={int(plan.timeout_s)}"]
        if local_addr:
            cmd += ["--local-addr", local_addr]
    else:
        cmd += ["--nnodes", str(plan.nnodes), "--node-rank", str(plan.node_rank),
                "--master-addr", plan.master_addr, "--master-port", str(plan.master_port),
                "--rdzv-conf", f"timeout={int(plan.timeout_s)}"]
    if plan.max_restarts is not None:
        cmd += ["--max-restarts", str(plan.max_restarts)]
    return cmd + list(extra or []) + ["-m", "fsdptrain", "train", *args]


def _host_port(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


# ----------------------------------------------------------------------------- the pre-flight rendezvous


def _hello(plan: Plan) -> dict:
    return {HELLO_KEY: 1, "node_rank": plan.node_rank, "nnodes": plan.nnodes, "nproc": plan.nproc,
            "host": socket.gethostname(), "elastic": plan.elastic}


def _listen(plan: Plan) -> socket.socket:
    """Node 0's listening socket on every interface (as torch's TCPStore binds), port MASTER_PORT."""
    where = f"{_host_port(plan.master_addr, plan.master_port)}"
    if socket.has_dualstack_ipv6():
        srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        bind_to: tuple = ("::", plan.master_port)
    else:
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        bind_to = ("0.0.0.0", plan.master_port)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        srv.bind(bind_to)
        srv.listen(64)
    except OSError as e:
        srv.close()
        raise LaunchError(
            f"[node 0] port {plan.master_port} is already in use on this host ({socket.gethostname()}), so the "
            f"rendezvous at {where} cannot start ({e.strerror}); stop what holds it (`ss -ltnp | grep "
            f":{plan.master_port}`: an earlier run?) or set another MASTER_PORT on every node"
        ) from None
    return srv


def _recv_line(conn: socket.socket, deadline: float) -> Optional[bytes]:
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        conn.settimeout(left)
        try:
            chunk = conn.recv(4096)
        except (TimeoutError, OSError):
            return None
        if not chunk:
            return None
        buf += chunk
        if len(buf) > 65536:
            return None
    return buf.split(b"\n", 1)[0]


def _check_hello(plan: Plan, hello: dict, joined: dict[int, dict]) -> Optional[str]:
    """A problem with a joining node, or None."""
    r, host = hello.get("node_rank"), hello.get("host", "?")
    if hello.get("nnodes") != plan.nnodes:
        return (f"NNODES differs between nodes: node 0 ({socket.gethostname()}) has NNODES={plan.nnodes}, "
                f"node {r} ({host}) has NNODES={hello.get('nnodes')}; set the same NNODES on every node")
    if not isinstance(r, int) or r == 0 or r in joined or not 0 < r < plan.nnodes:
        other = "node 0 (this host)" if r == 0 else (f"{joined[r]['host']}" if r in joined else "")
        return (f"NODE_RANK={r} from {host} is " + (f"already taken by {other}" if other else
                f"outside 1..{plan.nnodes - 1}") + "; give every node its own NODE_RANK from 0 to NNODES-1")
    if hello.get("nproc") != plan.nproc:
        return (f"NPROC_PER_NODE differs between nodes: node 0 ({socket.gethostname()}) has {plan.nproc}, "
                f"node {r} ({host}) has {hello.get('nproc')}; set the same NPROC_PER_NODE on every node")
    return None


def host_rendezvous(plan: Plan) -> list[dict]:
    """Node 0: wait for NNODES-1 nodes, check their settings, answer all, release the port."""
    where = _host_port(plan.master_addr, plan.master_port)
    ip = resolve(plan.master_addr)
    if not is_local_address(ip):
        raise LaunchError(
            f"[node 0] MASTER_ADDR={plan.master_addr} ({ip}) is not an address of this host "
            f"({socket.gethostname()}), but node 0 hosts the rendezvous there; set MASTER_ADDR to node 0's own "
            "address on every node (`hostname -I` on node 0), or run this with NODE_RANK other than 0"
        )
    srv = _listen(plan)
    if plan.elastic or plan.nnodes == 1:  # the port is free and ours; torchrun's c10d store does the rest
        srv.close()
        return []
    deadline = time.monotonic() + plan.timeout_s
    joined: dict[int, dict] = {}
    conns: list[socket.socket] = []
    problem: Optional[str] = None
    try:
        while len(joined) < plan.nnodes - 1 and problem is None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            srv.settimeout(left)
            try:
                conn, peer = srv.accept()
            except TimeoutError:
                break
            line = _recv_line(conn, min(deadline, time.monotonic() + 10))
            try:
                hello = json.loads(line) if line else None
            except ValueError:
                hello = None
            if not isinstance(hello, dict) or hello.get(HELLO_KEY) != 1:
                conn.close()  # something else knocked on the port (a scanner, a stale torchrun): ignore it
                continue
            conns.append(conn)
            problem = _check_hello(plan, hello, joined)
            if problem is None:
                joined[hello["node_rank"]] = {**hello, "peer": peer[0].removeprefix("::ffff:")}
        if problem is None and len(joined) < plan.nnodes - 1:
            missing = [r for r in range(1, plan.nnodes) if r not in joined]
            problem = (
                f"node(s) {', '.join(map(str, missing))} of {plan.nnodes} did not join the rendezvous at {where} "
                f"within {plan.timeout_s:.0f} s (RDZV_TIMEOUT); on those nodes check that the launch was started "
                f"with MASTER_ADDR={plan.master_addr} MASTER_PORT={plan.master_port} NNODES={plan.nnodes}, that "
                f"they reach this address (`nc -zv {plan.master_addr} {plan.master_port}` from there) and that no "
                "firewall blocks the port"
            )
        verdict = json.dumps({"ok": problem is None, "message": problem or ""}).encode() + b"\n"
        for c in conns:
            try:
                c.sendall(verdict)
            except OSError:
                pass
        # Let the other side close first, so no TIME_WAIT is left on our port for torchrun to trip over.
        end = time.monotonic() + 5
        for c in conns:
            _recv_line(c, end)
    finally:
        for c in conns:
            c.close()
        srv.close()
    if problem:
        raise LaunchError(f"[node 0] {problem}")
    return list(joined.values())


def _connect(plan: Plan, deadline: float) -> socket.socket:
    ip = resolve(plan.master_addr)
    where = _host_port(plan.master_addr, plan.master_port)
    last = "no attempt"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            src, ifname = route_to(ip)
            via = f" (this host reaches it from {src} on {ifname})" if src else " (this host has no route to it)"
            raise LaunchError(
                f"[node {plan.node_rank}] could not reach node 0's rendezvous at {where}{via} within "
                f"{plan.timeout_s:.0f} s (RDZV_TIMEOUT), last error: {last}; check that MASTER_ADDR is node 0's "
                f"address as seen from this host, that node 0 was started with MASTER_PORT={plan.master_port}, "
                "and that no firewall blocks the port"
            )
        try:
            return socket.create_connection((ip, plan.master_port), timeout=min(5.0, left))
        except OSError as e:
            last = e.strerror or type(e).__name__
            if isinstance(e, socket.timeout):
                last = "connection timed out"
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def join_rendezvous(plan: Plan) -> None:
    """Node 1..N-1: say who we are to node 0 and wait for its verdict."""
    where = _host_port(plan.master_addr, plan.master_port)
    conn = _connect(plan, time.monotonic() + plan.timeout_s)
    with conn:
        conn.sendall(json.dumps(_hello(plan)).encode() + b"\n")
        # Once connected, the answer is node 0's to give: it arrives within node 0's own timeout.
        line = _recv_line(conn, time.monotonic() + plan.timeout_s + 15)
    try:
        verdict = json.loads(line) if line else None
    except ValueError:
        verdict = None
    if not isinstance(verdict, dict):
        raise LaunchError(
            f"[node {plan.node_rank}] something answers at {where} but it is not node 0's fsdptrain launcher "
            "(another service on MASTER_PORT, or node 0 started torchrun without launch/torchrun.sh, or node 0 "
            "failed: see its log); check MASTER_ADDR/MASTER_PORT and start node 0 with launch/torchrun.sh"
        )
    if not verdict.get("ok"):
        raise LaunchError(f"[node {plan.node_rank}] node 0 at {where} refused this node: {verdict.get('message')}")


def reach_check(plan: Plan) -> None:
    """Elastic runs, nodes other than 0: wait until node 0's c10d store accepts connections."""
    _connect(plan, time.monotonic() + plan.timeout_s).close()


def preflight(plan: Plan) -> None:
    if plan.node_rank == 0:
        joined = host_rendezvous(plan)
        if joined:
            hosts = ", ".join(f"node {j['node_rank']} {j['host']} ({j['peer']})" for j in
                              sorted(joined, key=lambda j: j["node_rank"]))
            say(f"all {plan.nnodes} nodes joined {_host_port(plan.master_addr, plan.master_port)}: {hosts}")
    elif plan.elastic:
        reach_check(plan)
    else:
        join_rendezvous(plan)
        say(f"node 0 at {_host_port(plan.master_addr, plan.master_port)} accepted this node")


# ----------------------------------------------------------------------------- entry point


def say(msg: str) -> None:
    log.rank_line(f"{PREFIX}: {msg}")  # every node's launcher says what it does


def check_config(argv: list[str]) -> None:
    """Validate `[CONFIG] [key=value ...]` like `fsdptrain train` will (config.py imports no torch: fast)."""
    from .config.schema import load_config, refuse_config_flag

    refuse_config_flag(argv, "launch/torchrun.sh")
    args = [a for a in argv if not a.startswith("-")]
    config = args[0] if args and ("=" not in args[0] or args[0].endswith((".yaml", ".yml"))) else None
    load_config(config, [a for a in args if a is not config])


def main(argv: list[str]) -> int:
    env = dict(os.environ)
    try:
        check_config(argv)  # a typo in the config fails here, on every node, before any process starts
    except UserError as e:
        log.error(str(e))
        return 2
    try:
        plan = read_plan(env)
        ip = resolve(plan.master_addr)
        src, ifname = route_to(ip)
        set_env, notes = interface_env(plan, env, ip, ifname)
        mode = (f"elastic c10d id {plan.rdzv_id}, nodes {plan.min_nnodes}..{plan.max_nnodes}" if plan.elastic
                else "static")
        say(f"node {plan.node_rank}/{plan.nnodes} on host {socket.gethostname()}: {plan.nproc} process(es), "
            f"rendezvous {_host_port(plan.master_addr, plan.master_port)} ({mode}), "
            f"local address {src} on {ifname}, timeout {plan.timeout_s:.0f} s")
        for note in notes:
            say(note)
        if env.get("FSDPTRAIN_SKIP_PREFLIGHT", "") not in ("", "0"):
            say("FSDPTRAIN_SKIP_PREFLIGHT set: no pre-flight rendezvous")
        else:
            preflight(plan)
    except LaunchError as e:
        log.error(str(e))
        return 2
    env.update(set_env)
    # torchrun sets OMP_NUM_THREADS=1 in its workers when it is unset: whether the user chose it is known only
    # here (train/optim.py gives an optimizer on the CPU its share of the node's CPUs unless the user chose)
    env["FSDPTRAIN_OMP_NUM_THREADS_UNSET"] = "0" if env.get("OMP_NUM_THREADS", "") else "1"
    extra = shlex.split(env.get("TORCHRUN_EXTRA_ARGS", ""))
    cmd = torchrun_command(plan, argv, src if plan.multi_node else None, extra=extra)
    log_file = launchlog.log_path(env, plan.node_rank)
    if log_file is not None and sys.stdout.isatty():
        env["FSDPTRAIN_TTY"] = "1"  # the workers write to the log file: rank 0 still draws a progress bar
    say("exec " + " ".join(f"{k}={v}" for k, v in set_env.items()) + (" " if set_env else "") + shlex.join(cmd)
        + (f" > {log_file} (shown here without torchrun's own report of failures)" if log_file else ""))
    sys.stdout.flush()
    # Slurm's --signal=USR1 reaches every process of the step: torchrun's agent would die of it (it handles
    # TERM, INT, HUP, QUIT only). Ignored here, it stays ignored through exec in the agent; the workers set
    # their own handler (fsdptrain.dist.stopping), so they save and stop.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        log_fd = launchlog.open_log(log_file) if log_file is not None else None
    except OSError as e:  # the log folder: not writable, no space
        log.error(f"FSDPTRAIN_LAUNCH_LOG: cannot write {log_file} ({e.strerror}); set FSDPTRAIN_LAUNCH_LOG to a "
                  "writable folder, or to 0 for torchrun's output as it is")
        return 2
    launchlog.exec_torchrun(cmd, env, (log_fd, log_file) if log_fd is not None and log_file else None)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
