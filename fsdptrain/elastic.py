"""A fresh rendezvous store for each torchrun restart attempt.

torchrun's c10d rendezvous hands workers a TCPStore that its agent keeps alive
across restarts (TORCHELASTIC_USE_AGENT_STORE=True). The keys the previous
attempt's process group wrote (gloo listening addresses, the NCCL unique id)
are still in it, so a restarted worker can read a dead peer's address and
fail with "Connection refused" (pytorch issue 135712; restart counts are not
globally consistent, so they cannot serve as a key prefix).

Here global rank 0 starts its own TCPStore on a free port, stores a random
token in it and publishes "port:token" in the agent's store. The other ranks
read that entry and connect; a stale entry (from a dead attempt) either
refuses the connection or shows another token, and they read it again. The
process group is then created on the fresh store, which holds no old keys.
"""

from __future__ import annotations

import datetime
import os
import secrets
import socket
import time
from typing import Optional

import torch.distributed as dist

from .errors import LaunchError

_KEY = "fsdptrain/fresh_store"
_PROBE = datetime.timedelta(seconds=3)
_keep: list = []  # rank 0's server must live as long as the process group


def fresh_store(rank: int, world_size: int, timeout: datetime.timedelta) -> Optional[dist.Store]:
    """A store with no keys of earlier attempts, or None when not launched by torchrun's agent store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    run = os.environ.get("TORCHELASTIC_RUN_ID", "run")
    agent = dist.TCPStore(addr, port, None, False, timeout=timeout)
    key = f"{_KEY}/{run}"
    if rank == 0:  # rank 0 runs on the node that hosts the agent store, so MASTER_ADDR reaches it
        server = dist.TCPStore(addr, 0, world_size, True, timeout=timeout, wait_for_workers=False)
        token = secrets.token_hex(16)
        server.set("token", token)
        agent.set(key, f"{server.port}:{token}")
        _keep.append(server)
        return server
    deadline = time.monotonic() + timeout.total_seconds()
    while time.monotonic() < deadline:
        entry = agent.get(key).decode()  # blocks until some attempt published one
        p, _, token = entry.partition(":")
        try:
            # A plain socket first: a dead attempt's port refuses at once, where a TCPStore client
            # would retry for its whole timeout and log a stack trace per try.
            socket.create_connection((addr, int(p)), timeout=_PROBE.total_seconds()).close()
            client = dist.TCPStore(addr, int(p), None, False, timeout=_PROBE)
            if client.get("token").decode() == token:
                client.set_timeout(timeout)
                return client
        except (OSError, RuntimeError, ValueError, dist.DistStoreError):
            pass  # the entry is from a dead attempt: wait for rank 0 of this one
        time.sleep(0.2)
    raise LaunchError(f"rank {rank}: global rank 0 did not publish a rendezvous store at {addr}:{port} within "
                      f"{timeout}; check that every worker started")
