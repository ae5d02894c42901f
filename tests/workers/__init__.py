"""Worker scripts the tests launch under torchrun (python -m tests.workers.NAME).

Each worker ends through `finish`, the way `python -m fsdptrain` ends a rank of a multi-process run that
succeeded: output flushed, then `os._exit(0)`, skipping the interpreter's teardown. That teardown runs the
destructors of gloo's and the rendezvous store's C++ objects, and it aborted a rank (SIGABRT with no Python
frame, after the worker's last line had run) about once in a few hundred launches; the product never runs it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def finish(main: Callable[..., None], *args) -> None:
    """Run a worker's `main`; once it returns, flush and leave without teardown. An exception propagates as usual
    (a traceback and exit status 1)."""
    main(*args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
