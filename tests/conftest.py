"""Suite-wide guard: a test that leaves a torch.distributed process group behind would make the next in-process
test in the same pytest worker fail with "trying to initialize the default process group twice"; the guard
fails the leaking test instead (and cleans up, so the rest of the worker's tests run)."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(autouse=True)
def no_process_group_left_behind(request):
    yield
    dist = sys.modules.get("torch.distributed")  # never import torch for tests that do not use it
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        pytest.fail(f"{request.node.nodeid} left a torch.distributed process group initialized")
