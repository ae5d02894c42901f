"""`python -m fsdptrain ...` (also what `torchrun ... -m fsdptrain ...` runs).

A rank of a multi-process run (WORLD_SIZE > 1) ends with `os._exit` once the command is over and its output
flushed: the process group is already shut down by then (trainer.train), and what the interpreter's own
teardown would still do (destructors of gloo's and the rendezvous store's C++ objects, joining leftover
threads) is nothing the run needs, but it can block. torchrun's agent waits in its exit barrier until every
node's ranks have exited, so one rank stuck there holds every node's agent for its 300 s timeout.
"""

import os
import sys

from .cli import main


def _exit_code(code: object) -> int:
    """What the interpreter makes of SystemExit's code: None is 0, an int itself, anything else is printed
    and is 1."""
    if code is None or isinstance(code, int):
        return code or 0
    sys.stderr.write(f"{code}\n")
    return 1


try:
    main(prog_name="fsdptrain")
except SystemExit as e:
    world = os.environ.get("WORLD_SIZE", "")
    if not world.isdigit() or int(world) <= 1:
        raise
    status = _exit_code(e.code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
