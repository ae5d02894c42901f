"""2-rank runs on LLaMA-Factory data equal a single process on the same global batches.

One torchrun launch (tests/workers/dist_cases.py) runs three cases on identity.json: uneven
per-rank micro-batch sizes [3, 1], token-budget micro-batches, and packed rows.
Rank 0 tokenises into the cache while rank 1 waits; the test then reads the same
cache in process (a cache hit) and replays each step's global batch, example by
example and unpacked, through the plain reference loop (tests/reference.py).
"""

from __future__ import annotations

import json

import pytest
import yaml

from fsdptrain.config.schema import load_config
from fsdptrain.data import pipeline
from fsdptrain.data.packing import PackedExamples
from fsdptrain.data.tokenizer import load_tokenizer
from tests.helpers import LLAMA, REPO, make_model_dir, read_metrics, torchrun
from tests.reference import STEPS, base_config, reference_run

LF = REPO.parent / "shared" / "data" / "llamafactory"
pytestmark = pytest.mark.skipif(not (LF / "identity.json").is_file(),
                                reason=f"LLaMA-Factory fixtures not found at {LF}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("datadist")
    llama = make_model_dir(root / "llama", LLAMA, seed=4)
    data = {"dataset_dir": str(LF), "datasets": ["identity"], "max_length": 96, "cache_dir": str(root / "cache")}
    cases = {
        "sizes": base_config(root / "sizes", llama, data={**data, "micro_batch_sizes": [3, 1]}),
        "budget": base_config(root / "budget", llama, data={**data, "token_budget": 224}),
        "packed": base_config(root / "packed", llama, data={**data, "packing": True, "pack_length": 192},
                              train={"micro_batch_size": 1}),
    }
    spec = {"cases": []}
    for name, cfg in cases.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        spec["cases"].append({"name": name, "config": str(path)})
    (root / "spec.json").write_text(json.dumps(spec))
    proc = torchrun(2, ["-m", "tests.workers.dist_cases", str(root / "spec.json")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("data: tokenising") == 1  # built once (first case), then read from the cache
    return root, llama


def replay(root, llama, name):
    """(losses of the 2-rank run, reference losses, per-step micro-batch sizes of both ranks)."""
    cfg = load_config(str(root / f"{name}.yaml"))
    tok = load_tokenizer(None, str(llama))
    lines: list[str] = []
    examples = pipeline.load_examples(cfg, tok, log=lines.append)
    assert any(x.startswith("data: cache hit") for x in lines)
    samplers = [pipeline.build_sampler(cfg, examples, 2, r, 2) for r in range(2)]
    flat, batches, shapes = [], [], []
    for step in range(STEPS):
        parts = [s.rank_micro_batches(step) for s in samplers]
        shapes.append([[len(mb) for mb in p] for p in parts])
        idx = [i for p in parts for mb in p for i in mb]
        if isinstance(examples, PackedExamples):  # the reference runs each packed example on its own
            unpacked = [e for i in idx for e in examples.unpacked(i)]
            batches.append(list(range(len(flat), len(flat) + len(unpacked))))
            flat += unpacked
        else:
            batches.append(idx)
    ref, _ = reference_run(llama, flat if flat else examples, batches)
    got = [m["loss"] for m in read_metrics(root / name)]
    return got, ref, shapes


@pytest.mark.parametrize("name", ["sizes", "budget", "packed"])
def test_two_ranks_match_one_process_on_the_same_global_batches(runs, name):
    root, llama = runs
    got, ref, shapes = replay(root, llama, name)
    assert len(got) == STEPS
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-5, (got, ref)
    assert len({round(x, 4) for x in ref}) == STEPS  # the losses move, so agreement is not trivial
    if name == "sizes":
        assert all(s == [[3], [1]] for s in shapes)  # rank 0 takes 3 examples per micro-step, rank 1 one
    if name == "budget":
        assert len({a for s in shapes for a in (len(s[0]), len(s[1]))}) == 1  # same micro-steps on both ranks
