"""memory.breakdown_steps: a real step measured by category on every rank, and `fsdptrain mem report` naming the
category that differs between ranks.

One 2-rank gloo launch (tests/workers/breakdown_cases.py) trains the same config five times (and runs
`fsdptrain estimate` on it, for the CUDA-only allowance line): without tracking,
with memory.breakdown_steps=[3, 4, 5], and steps 1-2 by the trainer then steps 3-5 under memory.trace.measure_steps (the
tracker function of `estimate --trace`, an independent measurement of the same step; both sides track steps
3-5, which hold the same bytes, and are compared per phase at the step that held least); then untracked and tracked
again with selective activation checkpointing and bf16-mixed (whose recompute opened profiler ranges the selective
replay had not recorded, tracked or not, before parallelize._PROFILER_OPS). Rank 0 gets 3 rows per
micro-batch and rank 1 one row of the same width (data.micro_batch_sizes [3, 1]), so only activations differ.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from fsdptrain.cli import main
from fsdptrain.config.schema import load_config
from fsdptrain.core.errors import ConfigError
from fsdptrain.core.units import format_bytes
from fsdptrain.memory import breakdown
from tests.helpers import cli_inproc, torchrun

STEP, SEQ = 3, 64
REPEATS = 3  # steps STEP..STEP+2 tracked and measured (one width: the same bytes in each)
TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "tie_word_embeddings": False}
CONFIG = {"seed": 3, "model": {"hf_config": TINY},
          "data": {"max_length": 96, "micro_batch_sizes": [3, 1], "shuffle": False},
          "train": {"max_steps": 5, "lr": 1e-3, "warmup_steps": 0},
          "parallel": {"device": "cpu", "precision": "fp32"}, "checkpoint": {"save_at_end": False},
          "logging": {"log_every": 1, "tensorboard": False, "progress": "none"}}
# The trainer's step holds a few small tensors measure_steps' does not: the step's token counts (float64 [2],
# made before the forward, so in every phase) and, in the optimizer phase, the gathered per-rank losses and the
# float grad norm. The tracker files them under activations; every other category is exact.
SMALL = 64


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("breakdown")
    (root / "run.yaml").write_text(yaml.safe_dump(CONFIG))
    (root / "spec.json").write_text(json.dumps({"config": str(root / "run.yaml"), "root": str(root), "step": STEP,
                                                "repeats": REPEATS, "seq": SEQ}))
    proc = torchrun(2, ["-m", "tests.workers.breakdown_cases", str(root / "spec.json")], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def least_per_phase(phase_lists: list[list[dict]]) -> list[dict]:
    """Per phase, the step that held least: a real gloo run now and then holds a collective's scalar buffer over
    into a phase (docs/memory.md), on either side of the comparison, and a held-over buffer only ever adds."""
    return [min(same, key=lambda p: p["total"]) for same in zip(*phase_lists)]


def test_breakdown_files_equal_measure_steps_and_leave_the_losses_alone(runs):
    steps = range(STEP, STEP + REPEATS)
    files = sorted(p.name for p in (runs / "tracked" / "memory").glob("breakdown_*"))
    assert files == sorted(f"breakdown_step{s}_rank{r}.json" for s in steps for r in range(2))
    assert not list((runs / "plain" / "memory").glob("breakdown_*"))
    for r in range(2):
        tracked = [_read(runs / "tracked" / "memory" / f"breakdown_step{s}_rank{r}.json") for s in steps]
        ref = _read(runs / f"measured_rank{r}.json")
        names = ["forward #0", "backward #0", "optimizer"]
        assert [p["phase"] for p in ref["phases"]] == names * REPEATS
        assert [p["step"] for p in ref["phases"]] == [n for n in range(1, REPEATS + 1) for _ in names]
        for s, mine in zip(steps, tracked):
            assert (mine["step"], mine["rank"], mine["world_size"]) == (s, r, 2)
            assert mine["micro_batches"] == [[3 if r == 0 else 1, SEQ]]
            assert [p["phase"] for p in mine["phases"]] == names
            assert mine["optimizer_state"] == ref["optimizer_state"] > 0
            peak = max(mine["phases"], key=lambda p: p["total"])
            assert mine["peak"] == {"phase": peak["phase"], "total": peak["total"], "by_category": peak["by_category"]}
        theirs = least_per_phase([ref["phases"][k * len(names):(k + 1) * len(names)] for k in range(REPEATS)])
        for p, q in zip(least_per_phase([m["phases"] for m in tracked]), theirs):
            extra = p["total"] - q["total"]
            assert 0 < extra <= SMALL, (r, p["phase"], p["total"], q["total"])
            assert {**p["by_category"], "activations": p["by_category"]["activations"] - extra} == q["by_category"]
    a0, a1 = (_read(runs / "tracked" / "memory" / f"breakdown_step{STEP}_rank{r}.json")["peak"]["by_category"]
              ["activations"] for r in range(2))
    assert a0 > 2.5 * a1 > 0  # 3 rows against 1
    for r in range(2):  # tracking changes no number of the run
        plain, tracked = (_read(runs / f"losses_{n}_rank{r}.json")["losses"] for n in ("plain", "tracked"))
        assert plain == tracked and len(plain) == CONFIG["train"]["max_steps"]


def test_mem_report_sets_ranks_side_by_side_and_names_activations(runs):
    run_dir = runs / "tracked"
    res = CliRunner().invoke(main, ["mem", "report", str(run_dir)])
    assert res.exit_code == 0, res.output
    out = res.output
    b = [_read(run_dir / "memory" / f"breakdown_step{STEP}_rank{r}.json") for r in range(2)]
    cats = [pk["peak"]["by_category"] for pk in b]
    assert f"memory by category at step {STEP} (memory.breakdown_steps; each rank at its own peak):" in out
    for c in ("parameters (sharded)", "optimizer state", "activations"):
        assert f"  {c:<24}{format_bytes(cats[0][c]):>12}{format_bytes(cats[1][c]):>12}" in out
    totals = [pk["peak"]["total"] for pk in b]
    ratio = max(totals) / statistics.median(totals)
    diff = cats[0]["activations"] - cats[1]["activations"]
    assert (f"imbalance: max/median peak = {ratio:.2f} (over memory.imbalance_warn 1.2), rank 0 highest; the category "
            f"that differs most: activations (rank 0 {format_bytes(cats[0]['activations'])}, rank 1 "
            f"{format_bytes(cats[1]['activations'])}, difference {format_bytes(diff)}):") in out
    # the tracked step's time against the untracked logged steps (metrics.jsonl; step 1 is warm-up)
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    base = statistics.median(m["step_time_s"] for m in metrics if m["step"] not in (1, *range(STEP, STEP + REPEATS)))
    tracked = b[0]["seconds"]
    assert tracked == next(m["step_time_s"] for m in metrics if m["step"] == STEP)
    assert f"tracked step time: {tracked:.3f} s, {tracked / base:.1f}x the untracked steps' median {base:.3f} s" in out
    print(f"\ntracked step {STEP}: {tracked:.3f} s vs untracked median {base:.3f} s ({tracked / base:.1f}x)")


def test_bad_breakdown_steps_and_what_the_tracker_cannot_follow_are_one_line_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    res = cli_inproc(["config", str(path), "memory.breakdown_steps=[0, 2]"])
    assert (res.returncode, res.stderr) == (2, "fsdptrain: error: override 'memory.breakdown_steps=[0, 2]': "
                                               "memory.breakdown_steps: expected optimizer steps (integers >= 1, e.g. "
                                               "[3]), got [0]\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**CONFIG, "memory": {"breakdown_steps": [2, "three", True]}}))
    res = cli_inproc(["config", str(bad)])
    assert (res.returncode, res.stderr) == (2, f"fsdptrain: error: {bad}: memory.breakdown_steps: expected optimizer "
                                               "steps (integers >= 1, e.g. [3]), got ['three', True]\n")
    cfg = load_config(str(path), ["memory.breakdown_steps=[2]", "parallel.compile=true"])
    with pytest.raises(ConfigError, match=r"^memory.breakdown_steps: the tracker does not see inside compiled"):
        breakdown.check(cfg)
    breakdown.check(load_config(str(path), ["parallel.compile=true"]))  # nothing tracked: nothing refused


def test_selective_checkpointing_is_tracked_and_the_losses_stay_bitwise(runs):
    """bf16-mixed with selective checkpointing on 2 ranks: the replay in backward lets FSDP's profiler ranges
    through (parallelize._PROFILER_OPS), so the run trains, tracked or not, with the same losses, and the tracked
    step records every phase."""
    for rank in range(2):
        assert (_read(runs / f"losses_selective_tracked_rank{rank}.json")["losses"]
                == _read(runs / f"losses_selective_plain_rank{rank}.json")["losses"])
        sel = _read(runs / "selective_tracked" / "memory" / f"breakdown_step{STEP}_rank{rank}.json")
        assert [p["phase"] for p in sel["phases"]] == ["forward #0", "backward #0", "optimizer"]
        assert sel["phases"][0]["by_category"]["activations"] > 0
        assert not list((runs / "selective_plain" / "memory").glob("breakdown_*"))


def test_estimate_prints_the_cuda_only_allowance_as_its_own_line(runs):
    """The allowance line adds up to the verdict's own figure (peak x FRAGMENTATION + RUNTIME_OVERHEAD). The
    command ran in the launched worker (transformers' model code is loaded there already)."""
    from fsdptrain.memory.estimate import FRAGMENTATION, RUNTIME_OVERHEAD

    res = _read(runs / "estimate.json")
    assert res["exit"] == 0, res["output"]
    need = res["peak"] * FRAGMENTATION + RUNTIME_OVERHEAD
    assert f"about {format_bytes(need)} of 80.00 GiB" in res["output"]
    line = next(x for x in res["output"].splitlines() if x.startswith("CUDA-only allowance"))
    assert line == (f"CUDA-only allowance (not in the terms above): {format_bytes(int(need) - res['peak'])} = "
                    "allocator caching/fragmentation 5% of the peak + CUDA context, NCCL buffers, kernel workspaces "
                    f"2.00 GiB; peak + allowance {format_bytes(int(need))} of 80.00 GiB")
