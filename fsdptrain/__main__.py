"""`python -m fsdptrain ...` (also what `torchrun ... -m fsdptrain ...` runs).

A rank of a multi-process run (WORLD_SIZE > 1) that finished its command (exit status 0) ends with `os._exit`
once its output is flushed: the process group is already shut down by then (trainer.train), and what the
interpreter's own teardown would still do (destructors of gloo's and the rendezvous store's C++ objects, joining
leftover threads) is nothing the run needs, but it can block. torchrun's agent waits in its exit barrier until
every node's ranks have exited, so one rank stuck there holds every node's agent for its 300 s timeout. Any
other status exits as usual: torchrun stops the remaining ranks as soon as one exits non-zero, and a rank that
left at once would cut off rank 0's last line (e.g. "stopped by SIGUSR1 at step 6; ...").
"""

import os
import sys

from .cli import main

try:
    main(prog_name="fsdptrain")
except SystemExit as e:
    world = os.environ.get("WORLD_SIZE", "")
    if not world.isdigit() or int(world) <= 1 or e.code not in (None, 0):
        raise
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
