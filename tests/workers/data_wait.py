"""Two ranks through the data preparation's wait (the rendezvous store, not a collective).

Usage (under torchrun, 2 processes on one node): python -m tests.workers.data_wait DIR
DIR holds docs.jsonl and dataset_info.json. Case 1: local rank 0 tokenises for 2 s longer than usual, rank 1 waits
(up to a minute) and reads the same cache. Case 2: rank 0 takes 8 s, rank 1 gives up after 3 s with one line.
Each rank prints `rank R case N: ...` lines.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from fsdptrain.core.errors import UserError
from fsdptrain.data import cache
from fsdptrain.data.sources import resolve
from fsdptrain.data.tokenizer import build_char_tokenizer
from fsdptrain.dist import distributed
from tests.workers import finish


def main(folder: Path) -> None:
    info = distributed.init("cpu")
    build = cache.build
    try:
        tok = build_char_tokenizer()
        specs = resolve(["docs"], str(folder))
        for case, (delay, wait_minutes) in enumerate([(2.0, 1.0), (8.0, 0.05)], start=1):
            def slow_build(*args, delay=delay, **kwargs):
                time.sleep(delay)
                return build(*args, **kwargs)

            cache.build = slow_build
            s = cache.Settings(max_length=32 + case, train_on_prompt=False, mask_history=False, max_samples=None,
                               seed=1)
            try:
                got, _, _, hit = cache.prepare(specs, tok, s, folder / "cache", info.rank, info.local_rank, False,
                                               lambda m: None, wait_minutes)
                print(f"rank {info.rank} case {case}: {got.path.name} {len(got)} hit={hit}", flush=True)
            except UserError as e:
                print(f"rank {info.rank} case {case}: error: {e}", flush=True)
    finally:
        cache.build = build
        distributed.shutdown(info)


if __name__ == "__main__":
    finish(main, Path(sys.argv[1]))
