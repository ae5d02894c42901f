"""Process group, device and mesh set-up from the torchrun environment; rank helpers.

`python -m fsdptrain train` without torchrun runs as a one-process group (so the
loop is the same code path at every scale). Under torchrun we read RANK,
LOCAL_RANK, WORLD_SIZE (and LOCAL_WORLD_SIZE) and rendezvous through
MASTER_ADDR/MASTER_PORT via the env:// method. CUDA + NCCL when GPUs exist,
otherwise CPU + gloo with an explicit CPU device mesh (on a GPU machine the
default mesh would pick CUDA).
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..core import log
from .elastic import fresh_store
from ..core.errors import LaunchError, UserError


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str
    owns_group: bool  # we created the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_type(self) -> str:
        return self.device.type


def _env_int(name: str, default: Optional[int] = None) -> int:
    if os.environ.get(name, "") == "":
        if default is None:
            raise LaunchError(f"environment variable {name} is not set; launch with torchrun or unset WORLD_SIZE")
        return default
    return _int_var(os.environ, name)


def resolve_device_type(requested: str) -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        raise LaunchError("parallel.device: cuda was requested but no CUDA device is visible; "
                          "use parallel.device=cpu or auto")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def process_group_backend(device_type: str) -> str:
    """The backend of the default process group. CUDA: NCCL for CUDA tensors and gloo for CPU tensors in the same
    group, because some collectives meet CPU tensors: with parallel.cpu_offload the sharded gradients are on
    the CPU, so clip_grad_norm_'s norm and every full_tensor() (the norm, the export) all-reduce or all-gather
    CPU tensors, which an NCCL-only group refuses ("No backend type associated with device type cpu"). torch
    registers one backend per device type; device_id= still initialises NCCL eagerly, the device mesh's
    subgroups split both (ProcessGroup::splitGroup splits every backend), and object collectives go through
    gloo. CPU: gloo alone, as before."""
    return "cuda:nccl,cpu:gloo" if device_type == "cuda" else "gloo"


# Where launchers put a process's place on its node: (local rank, processes on the node) per launcher.
LOCAL_LAYOUT_VARIABLES = (("LOCAL_RANK", "LOCAL_WORLD_SIZE"),  # torchrun
                          ("SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),  # srun (--ntasks-per-node)
                          ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"))  # Open MPI's mpirun


def _int_var(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise LaunchError(f"environment variable {name}={env[name]!r} is not an integer") from None


def local_layout(env: Mapping[str, str], rank: int, world: int) -> tuple[int, int]:
    """(local rank, processes on this node) from the launcher's variables: torchrun's LOCAL_RANK and
    LOCAL_WORLD_SIZE, else srun's SLURM_LOCALID and SLURM_NTASKS_PER_NODE, else mpirun's OMPI_COMM_WORLD_LOCAL_RANK
    and _LOCAL_SIZE. Without any of them a multi-process launch is refused: every process would take device 0
    (and the hybrid mesh, per-node data preparation and node counts would see one node)."""
    for rank_var, size_var in LOCAL_LAYOUT_VARIABLES:
        if env.get(rank_var, "") == "":
            continue
        local_rank = _int_var(env, rank_var)
        if env.get(size_var, "") == "":
            if world > 1:
                raise LaunchError(f"{rank_var}={local_rank} is set but {size_var} is not; set {size_var} to the "
                                  "number of processes on this node")
            return local_rank, 1
        local_world = _int_var(env, size_var)
        if not 0 <= local_rank < local_world <= world:
            raise LaunchError(f"{rank_var}={local_rank}, {size_var}={local_world} with WORLD_SIZE={world}: need "
                              f"0 <= {rank_var} < {size_var} <= WORLD_SIZE; check the launch")
        return local_rank, local_world
    if world == 1:
        return 0, 1
    raise LaunchError(f"RANK={rank} WORLD_SIZE={world} are set but not LOCAL_RANK (nor SLURM_LOCALID or "
                      "OMPI_COMM_WORLD_LOCAL_RANK), so every process would use the same device; set LOCAL_RANK "
                      "and LOCAL_WORLD_SIZE for each process, or launch with torchrun (launch/torchrun.sh)")


def use_device(device_type: str, local_rank: int) -> None:
    """Make cuda:local_rank this process's current device (FSDP2 and NCCL take it from there); no-op on CPU."""
    if device_type != "cuda":
        return
    if local_rank >= torch.cuda.device_count():
        raise LaunchError(
            f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices are visible; "
            "lower --nproc-per-node or check CUDA_VISIBLE_DEVICES"
        )
    torch.cuda.set_device(local_rank)


def init(device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Join (or create) the default process group and pick this rank's device."""
    device_type = resolve_device_type(device)
    backend = process_group_backend(device_type)
    timeout = datetime.timedelta(minutes=timeout_minutes)

    if dist.is_initialized():  # e.g. several runs in one launched test process
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank, local_world = local_layout(os.environ, rank, world)
        use_device(device_type, local_rank)
        backend = str(dist.get_backend())
        owns = False
    elif "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
        local_rank, local_world = _join_launched_group(rank, world, device_type, backend, timeout)
        owns = True
    else:  # plain `python -m fsdptrain train`: a one-process group, no network
        rank, world, local_rank, local_world = 0, 1, 0, 1
        use_device(device_type, 0)
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        owns = True

    dev = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    log.configure(rank == 0)
    return DistInfo(rank, local_rank, world, local_world, dev, backend, owns)


def _join_launched_group(rank: int, world: int, device_type: str, backend: str,
                         timeout: datetime.timedelta) -> tuple[int, int]:
    """The process group of a launched job (torchrun, or RANK/WORLD_SIZE/MASTER_* from another launcher), and
    this process's watch over its peers. Returns (local rank, processes on this node)."""
    global _peers
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise LaunchError(f"{name} is not set; torchrun sets it (use torchrun, or export {name})")
    try:
        layout, unknown = local_layout(os.environ, rank, world), None
    except LaunchError as e:  # said after the peers are found: variables left in the shell get their own line
        layout, unknown = (0, 1), e
    try:
        store = fresh_store(rank, world, timeout)  # None unless torchrun's agent store (stale keys after a restart)
        if store is None and world > 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
            store = _store_without_agent(rank, world, timeout)
        if unknown is not None:
            raise unknown
        local_rank = layout[0]
        use_device(device_type, local_rank)
        dist.init_process_group(
            backend=backend,
            init_method=None if store is not None else "env://",
            store=store,
            rank=rank,
            world_size=world,
            timeout=timeout,
            device_id=torch.device("cuda", local_rank) if device_type == "cuda" else None,
        )
    except LaunchError:
        raise
    except Exception as e:  # rendezvous failures: say where we tried to go
        raise LaunchError(
            f"could not join the process group at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
            f"as rank {rank}/{world} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "check MASTER_ADDR/MASTER_PORT, the network interface and that every node started"
        ) from None
    _peers = PeerStop(rank, world)
    _peers.start_watching()  # heartbeats, a gone store, a peer that failed
    # One line per rank, so each node's log shows which ranks it runs (multi-node debugging).
    log.rank_line(f"fsdptrain: rank {rank}/{world} (local rank {local_rank}/{layout[1]}, node "
                  f"{node_index(rank, layout[1])}) on host {socket.gethostname()} joined "
                  f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}")
    return layout


def node_index(rank: int, local_world: int) -> int:
    """This process's node: torchrun's GROUP_RANK, srun's SLURM_NODEID, else rank // processes per node (ranks
    numbered node by node)."""
    for name in ("GROUP_RANK", "SLURM_NODEID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return rank // max(1, local_world)


def shutdown(info: DistInfo) -> None:
    global _peers
    if info.owns_group and _peers is not None:
        _peers.close()
        _peers = None
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _store_without_agent(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """RANK and WORLD_SIZE set, but no torchrun agent started this process: another launcher (srun, mpirun)
    or variables left in the shell. Find the peers within FSDPTRAIN_PEER_WAIT_S (default 30) seconds, or
    say so in one line instead of waiting for the process-group timeout."""
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    wait = float(os.environ.get("FSDPTRAIN_PEER_WAIT_S", "30"))
    log.rank_line(f"fsdptrain: rank {rank}: RANK/WORLD_SIZE are set but no torchrun agent started this process; "
                  f"waiting up to {wait:g} s for {world} ranks at {addr}:{port}")
    stale = (f"RANK={rank} WORLD_SIZE={world} are set but no torchrun agent started this process and the other "
             f"ranks did not join {addr}:{port} within {wait:g} s; variables left in the shell? `unset RANK "
             "WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE` for a one-process run, or launch with torchrun "
             "(FSDPTRAIN_PEER_WAIT_S waits longer)")
    try:
        store = dist.TCPStore(addr, port, world, rank == 0, timeout=datetime.timedelta(seconds=wait),
                              wait_for_workers=False)
    except Exception:  # noqa: BLE001 (no server to join: rank 0 never came)
        raise LaunchError(stale) from None
    store.add("fsdptrain/peers", 1)
    deadline = time.monotonic() + wait
    while store.add("fsdptrain/peers", 0) < world:
        if time.monotonic() > deadline:
            raise LaunchError(stale)
        time.sleep(0.1)
    store.set_timeout(timeout)
    return dist.PrefixStore("fsdptrain/pg", store)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def all_gather_rows(t: torch.Tensor, world_size: int) -> torch.Tensor:
    """Stack one small 1-D tensor from every rank into (world_size, n)."""
    out = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(out, t)
    return torch.stack(out)


_exchanges = 0  # exchanges through the store made by this process (every rank makes the same ones, in order)


def exchange_by_store(value: str, wait_s: float, late: Callable[[list[int]], str], poll_s: float = 0.5) -> list[str]:
    """Every rank's `value`, by rank, exchanged through the rendezvous store instead of a collective. For waits
    that can be long (one rank per node tokenising the data): ranks blocked in an NCCL collective are aborted by
    NCCL's watchdog past the process-group timeout, without a word; here the waiting ranks poll the store (one
    counter read per poll) and, after `wait_s` seconds without every answer, stop with UserError(late(ranks that
    have not answered)). A rank that fails meanwhile stops the others through PeerStop, as elsewhere."""
    global _exchanges
    _exchanges += 1
    store = dist.distributed_c10d._get_default_store()
    prefix = f"fsdptrain/exchange/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{_exchanges}"
    world = dist.get_world_size()
    store.set(f"{prefix}/{dist.get_rank()}", value)
    store.add(f"{prefix}/count", 1)
    deadline = time.monotonic() + wait_s
    keys = [f"{prefix}/{r}" for r in range(world)]
    while store.add(f"{prefix}/count", 0) < world:
        if time.monotonic() > deadline:
            raise UserError(late([r for r, k in enumerate(keys) if not store.check([k])]))
        time.sleep(poll_s)
    return [v.decode() for v in store.multi_get(keys)]


def on_rank0(fn: Callable[[], object]) -> object:
    """Run a check on rank 0 alone; a UserError it raises is raised on every rank (collective), so all ranks
    stop with the same one line. Returns fn's result on rank 0, None elsewhere."""
    result, error = None, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = fn()
        except UserError as e:
            error = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise UserError(error)
    return result


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class PeerStop:
    """Every rank stops within seconds when another fails, and the run says which one and why.

    A watchdog thread ticks once a second: it writes this rank's heartbeat into the rendezvous store and
    looks for a failure key. A rank that fails in a way it explains (out of memory) prints its one line,
    sets the failure key and exits; the others see the key and exit quietly, even while blocked inside a
    collective. A rank killed without a word (kill -9, a lost node) stops heartbeating: when a collective
    then fails on a survivor, `dead_ranks` names the ranks whose heartbeat stood still. When the store
    itself is gone (torchrun's agent was killed), there is nobody left to coordinate with: the rank says
    so in one line and exits. That is seen on a plain socket to the store's address that never carries a request
    (`store_closed`), checked before every store call: a store call on the broken connection would print c10d's
    C++ stack (46 `frame #N` lines) each time. Exiting is `os._exit`: a peer may be blocked in a collective, so no clean
    shutdown is possible. Keys are per run (the output_dir as configured, identical on every node) and per
    elastic restart, so a restarted group does not read the previous attempt's keys. One per process, made by
    `init` for a launched group (`peers()`); a rank that stops on a user error tells the others (`tell`), so
    they stop within a second instead of waiting in their next collective.
    """

    def __init__(self, rank: int, world_size: int, before_exit: Callable[[], None] = lambda: None):
        # the default store is the process group's own (per run, and per restart under torchrun: elastic.py)
        self.prefix = f"fsdptrain/peers/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self.key = f"{self.prefix}/failed"
        self.rank = rank
        self.world_size = world_size
        self.before_exit = before_exit
        self.failing = False
        self.store_failures = 0
        self._beat = 0
        self._stop = threading.Event()
        self._watch: Optional[threading.Thread] = None
        self.probe: Optional[socket.socket] = None

    def _store(self) -> dist.Store:
        return dist.distributed_c10d._get_default_store()

    def start_watching(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            self.probe = open_probe()
            self._tick()  # the first heartbeat before any collective can fail
            self._watch = threading.Thread(target=self._poll, name="fsdptrain-peer-watch", daemon=True)
            self._watch.start()

    def _tick(self) -> bool:
        """Heartbeat and failure check; False when the store cannot be reached."""
        self._beat += 1
        if self.store_closed():
            self.store_failures += 1
            return False
        try:
            store = self._store()
            store.set(f"{self.prefix}/alive/{self.rank}", f"{self._beat} {socket.gethostname()} {os.getpid()}")
            self.store_failures = 0
            return True
        except Exception:  # noqa: BLE001 (a broken connection: counted, acted on in _poll)
            self.store_failures += 1
            return False

    def store_closed(self) -> bool:
        """Whether the store's host closed the probe connection (torchrun's agent or rank 0's node is gone)."""
        if self.probe is None:
            return False
        try:
            return self.probe.recv(1, socket.MSG_PEEK) == b""  # nothing is ever sent to it: end-of-file
        except BlockingIOError:
            return False  # open, nothing to read: the store is there
        except OSError:
            return True  # reset

    def peer_failed(self) -> bool:
        if self.world_size <= 1 or not dist.is_initialized() or self.store_closed():
            return False
        try:
            return bool(self._store().check([self.key]))
        except Exception:  # noqa: BLE001 (the store went away: nothing to learn from it)
            return False

    def _poll(self) -> None:
        while not self._stop.wait(1.0):
            if not dist.is_initialized():
                return  # the group was destroyed (the run ended): nothing left to watch
            if self.failing:
                continue
            if not self._tick():  # a broken connection to the store does not heal: stop now
                if not self._stop.is_set() and dist.is_initialized():
                    self.store_gone()
            elif self.peer_failed():
                self.exit(1)

    def store_gone(self) -> None:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        log.error(f"rank {self.rank}: the rendezvous store at {where} is gone (torchrun's agent or the first node "
                  "stopped); stopping this rank. Rerun the same command to continue from the last checkpoint")
        self.exit(1)

    def dead_ranks(self, wait: float = 2.5) -> Optional[list[tuple[int, str, str]]]:
        """(rank, host, pid) of the ranks whose heartbeat stood still for `wait` seconds; None when the store
        cannot be reached."""
        if self.world_size <= 1 or not dist.is_initialized():
            return []
        if self.store_closed():
            return None
        try:
            store = self._store()
            keys = [f"{self.prefix}/alive/{r}" for r in range(self.world_size)]
            first = {r: store.get(k).decode() for r, k in enumerate(keys) if store.check([k])}
            time.sleep(wait)
            second = {r: store.get(k).decode() for r, k in enumerate(keys) if store.check([k])}
        except Exception:  # noqa: BLE001 (no store, no answer)
            return None
        dead = [r for r in first if r != self.rank and second.get(r) == first[r]]
        return [(r, *(first[r].split(" ")[1:3])) for r in dead]

    def exit(self, code: int) -> None:
        self.before_exit()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def fail(self, msg: str) -> None:
        """This rank failed: say so in one line, tell the others, exit."""
        self.failing = True
        log.error(msg)
        try:
            if not self.store_closed():
                self._store().set(self.key, msg)
        finally:
            self.exit(1)

    def tell(self, msg: str) -> None:
        """This rank stops with a message it prints itself: the others stop quietly within a second."""
        self.failing = True
        if self.store_closed():
            return  # no store: the peers find out through their own probes and collectives
        try:
            self._store().set(self.key, msg)
        except Exception:  # noqa: BLE001 (no store: the peers find out through their collectives)
            return
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and self.rank == 0:
            time.sleep(1.5)  # rank 0 hosts the store: let the others read the key before it goes

    def close(self) -> None:
        """Stop the watchdog and wait for its last tick. A tick is a store call in C++ with the GIL released: if the
        process group is destroyed and the interpreter finalizes while a daemon thread is inside one, the thread is
        unwound through C++ when it wants the GIL back, and the process aborts (SIGABRT) after a finished run."""
        self._stop.set()
        watch, self._watch = self._watch, None
        if watch is not None and watch is not threading.current_thread():
            watch.join(timeout=10)  # a tick takes milliseconds; a store that hangs is bounded by the 10 s
        if self.probe is not None:
            self.probe.close()
            self.probe = None


def open_probe() -> Optional[socket.socket]:
    """A plain TCP connection to the rendezvous store's address (MASTER_ADDR:MASTER_PORT, where torchrun's agent
    or rank 0 serves it) on which nothing is ever sent, or None when it cannot be opened. The store's server
    leaves a connection that sends nothing alone; when its process dies, the connection reads end-of-file."""
    try:
        probe = socket.create_connection((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])), timeout=10)
    except (KeyError, ValueError, OSError):
        return None
    probe.setblocking(False)
    return probe


_peers: Optional[PeerStop] = None  # this process's watch over its peers, for a group `init` created


def peers() -> Optional[PeerStop]:
    return _peers


def tell_peers(msg: str) -> None:
    """Called when this rank stops on a user error: the other ranks stop too (no-op without a group)."""
    if _peers is not None:
        _peers.tell(msg)
