"""A key prefix of its own for each torchrun restart attempt.

torchrun's c10d rendezvous hands workers a TCPStore that its agent keeps alive
across restarts (TORCHELASTIC_USE_AGENT_STORE=True). The keys the previous
attempt's process group wrote (gloo listening addresses, the NCCL unique id)
are still in it, so a restarted worker can read a dead peer's address and
fail with "Connection refused" (pytorch issue 135712). Restart counts are not
consistent across nodes, so they cannot serve as a prefix.

The handshake here: global rank 0 draws a random token T and publishes it.
Another rank reads T (which may be a dead attempt's), writes a ping with a
random nonce under T and waits briefly for rank 0's pong for that nonce.
Only a live rank 0 answers, and only under its own T, so a rank that got a
stale token times out, reads again and finds the new one. The process group
then uses the store under the prefix T, which holds no old keys. The store
stays the agent's, so it outlives every worker.
"""

from __future__ import annotations

import datetime
import os
import secrets
import time
from typing import Optional

import torch.distributed as dist

from ..core.errors import LaunchError

_WAIT = 1.0  # seconds to wait for a pong before reading the token again


def fresh_store(rank: int, world_size: int, timeout: datetime.timedelta) -> Optional[dist.Store]:
    """The agent's store under a prefix no earlier attempt used, or None when not under torchrun's agent store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(addr, port, None, False, timeout=timeout)
    key = f"fsdptrain/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/token"
    if rank == 0:
        token = secrets.token_hex(16)
        store.set(key, token)
        for r in range(1, world_size):  # answer each rank's ping under our token (fresh: nobody else used it)
            nonce = store.get(f"fsdptrain/{token}/ping/{r}").decode()
            store.set(f"fsdptrain/{token}/pong/{r}/{nonce}", "1")
        return dist.PrefixStore(f"fsdptrain/{token}/pg", store)
    deadline = time.monotonic() + timeout.total_seconds()
    pinged: dict[str, str] = {}
    while time.monotonic() < deadline:
        token = store.get(key).decode()  # blocks until some attempt published one
        if token not in pinged:
            pinged[token] = secrets.token_hex(8)
            store.set(f"fsdptrain/{token}/ping/{rank}", pinged[token])
        pong = f"fsdptrain/{token}/pong/{rank}/{pinged[token]}"
        until = time.monotonic() + _WAIT  # poll: store.wait with a timeout logs a C++ warning each time
        while time.monotonic() < until:
            if store.check([pong]):
                return dist.PrefixStore(f"fsdptrain/{token}/pg", store)
            time.sleep(0.05)
        # no pong: a dead attempt's token, or rank 0 is still answering lower ranks; look again
    raise LaunchError(f"rank {rank}: no answer from global rank 0 through the store at {addr}:{port} within "
                      f"{timeout}; check that every worker started")
