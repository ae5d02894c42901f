#!/usr/bin/env bash
# Launch fsdptrain on this node with torchrun. Run the same line on every node.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/torchrun.sh CONFIG [key=value ...]   # node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/torchrun.sh CONFIG [key=value ...]   # node 1
#
# Variables (LLaMA-Factory's names):
#   NNODES (1), NODE_RANK (0), NPROC_PER_NODE (visible GPUs, else 1),
#   MASTER_ADDR (node 0's address; 127.0.0.1 on one node), MASTER_PORT (29500; a free port on one node),
#   RDZV_TIMEOUT (300 s: how long nodes wait for each other before failing with a one-line message),
#   elastic runs: RDZV_ID (switches to torchrun's c10d rendezvous), MIN_NNODES, MAX_NNODES, MAX_RESTARTS (3),
#   TORCHRUN_EXTRA_ARGS (more torchrun flags), FSDPTRAIN_SKIP_PREFLIGHT=1 (skip the node check),
#   FSDPTRAIN_LAUNCH_LOG (folder of torchrun's log file, default the temporary folder; 0: no log file),
#   PYTHON (the interpreter; python3).
# GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME default to the interface of the route to MASTER_ADDR.
# The work is done by fsdptrain/launch.py: it prints the resolved command, checks that all nodes can meet
# at MASTER_ADDR:MASTER_PORT with matching settings, then execs torchrun -m fsdptrain train "$@" with its output
# going to a log file, shown here without torchrun's own report of failures (fsdptrain/launchlog.py): on a fault,
# one line per rank and one naming the log file.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -d "$here/fsdptrain" ]]; then  # running from a checkout: use its fsdptrain (workers inherit this)
  export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "${PYTHON:-python3}" -m fsdptrain.launch "$@"
