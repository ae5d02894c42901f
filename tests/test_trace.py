"""`fsdptrain estimate --trace`: the fake-tensor trace against a real 2-rank gloo run, the analytic model-state
terms against the trace, the command's table and the per-rank forecast from the data plan.

One 2-rank torchrun launch (tests/workers/trace_cases.py) measures real tensors of three configurations with the
same tracker function, collectives settled at issue; the fake traces run in this process under torch's fake
process group.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from fsdptrain.cli import main
from fsdptrain.config.schema import load_config
from fsdptrain.core.units import format_bytes
from fsdptrain.memory import estimate as analytic
from fsdptrain.memory import trace
from tests.helpers import torchrun

# vocab 301 and intermediate 100 do not divide by 2 ranks: rank 1 holds fewer rows than its padded shard
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 100, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 301, "tie_word_embeddings": False}
# one launch's worth (the test-time budget): bf16-mixed, full checkpointing of block 0 only (every_k), the chunked
# loss, and accumulation with gradients reduced only on the last micro-step; fp32 with selective checkpointing
CASES = {
    "bf16_everyk_chunked_nosync": {
        "parallel": {"device": "cpu", "precision": "bf16-mixed", "sync_grads_every_micro_step": False,
                     "activation_checkpointing": "every_k", "activation_checkpointing_k": 2},
        "data": {"max_length": 48}, "train": {"micro_batch_size": 2, "grad_accum_steps": 2, "loss_chunk_tokens": 40}},
    # selective checkpointing replays recorded ops in backward; the tracker's profiler ops must not break it
    "fp32_selective": {"parallel": {"device": "cpu", "precision": "fp32", "activation_checkpointing": "selective"},
                       "data": {"max_length": 48}, "train": {"micro_batch_size": 2}},
    # frozen bf16 base with fp32 adapters (no gradient, no optimizer state on the base), full checkpointing
    "bf16_lora_full": {"parallel": {"device": "cpu", "precision": "bf16-mixed", "activation_checkpointing": "full"},
                       "data": {"max_length": 48}, "train": {"micro_batch_size": 2},
                       "finetune": {"method": "lora"}},
}


def _config(root: Path, name: str, extra: dict) -> str:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"model": {"hf_config": TINY}, **extra}))
    return str(path)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Per case and rank: the real run's phases, measured by memory.trace.measure_steps on gloo."""
    root = tmp_path_factory.mktemp("trace")
    cases = []
    for name, extra in CASES.items():
        cfg = load_config(_config(root, name, extra), [])
        s = analytic.settings_from_config(cfg, 1, 2, 0)
        cases.append({"config": str(root / f"{name}.yaml"), "shapes": trace.config_shapes(s),
                      "out": str(root / name)})
    (root / "spec.json").write_text(json.dumps({"cases": cases}))
    proc = torchrun(2, ["-m", "tests.workers.trace_cases", str(root / "spec.json")], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, {name: [json.loads((root / name / f"rank{r}.json").read_text()) for r in range(2)]
                  for name in CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_fake_trace_equals_the_real_run_and_the_analytic_model_state(real, name):
    root, measured = real
    cfg = load_config(str(root / f"{name}.yaml"), [])
    hf = trace.load_hf_config(cfg)
    est = analytic.estimate(cfg, 1, 2, 80 << 30)
    for rank in range(2):
        shapes = trace.config_shapes(est.settings)
        fake = trace.trace_rank(cfg, hf, 2, 2, rank, shapes, 80 << 30, "cpu")
        mine = measured[name][rank]
        got = [p for p in fake.phases]
        assert [p.label for p in got] == [f"step {p['step']} {p['phase']}" for p in mine["phases"]]
        # The reference run settles each collective at issue (tests/workers/trace_cases.py), as the fake group
        # does; its phases are then equal to the byte, now and then but for a few bytes of scalars: 1% of the
        # phase's total bounds the total and every category.
        for p, q in zip(got, mine["phases"]):
            if p.warmup:  # step 1's optimizer on fake tensors also counts DTensor's first sharding propagation
                assert p.total >= q["total"]
                continue
            for c in trace.EXACT:  # model state: exact in every phase
                assert p.by_category[c] == q["by_category"][c], (rank, p.label, c)
            tol = q["total"] // 100
            assert abs(p.total - q["total"]) <= tol, (rank, p.label, p.total, q["total"])
            for c, b in p.by_category.items():
                assert abs(b - q["by_category"][c]) <= tol, (rank, p.label, c, b, q["by_category"][c])
        # the step's peak and each category's peak within 1%
        compared = [q for p, q in zip(got, mine["phases"]) if not p.warmup]
        real_peak = max(q["total"] for q in compared)
        assert abs(fake.peak.total - real_peak) <= real_peak // 100, (rank, fake.peak.total, real_peak)
        for c in trace.CATEGORIES:
            real_max = max(q["by_category"][c] for q in compared)
            assert abs(fake.category_max(c) - real_max) <= real_max // 100, (rank, c, fake.category_max(c), real_max)
        assert fake.optimizer_state == mine["optimizer_state"]
        # the analytic model-state terms are exact against the trace, on the full and the short shard
        e = analytic.compute(est.shape, est.settings, rank)
        assert e.terms["parameters (sharded)"] == fake.category_max("parameters (sharded)")
        assert e.terms["gradients (sharded)"] == fake.category_max("gradients (sharded)")
        assert e.terms["optimizer state (AdamW m, v, step)"] == fake.optimizer_state
    if "finetune" not in CASES[name]:  # the padded vocabulary and MLP rows: rank 1's shards are shorter
        assert measured[name][0]["optimizer_state"] > measured[name][1]["optimizer_state"]


def test_estimate_trace_forecast_prints_the_traced_table(tmp_path):
    """micro_batch_sizes [4, 1]: rank 0 carries 4x the rows, and the forecast names it; compile is traced eager."""
    cfg_path = _config(tmp_path, "fc", {"parallel": {"device": "cpu", "precision": "fp32", "compile": True},
                                        "data": {"synthetic_task": "add", "synthetic_examples": 40, "max_length": 64,
                                                 "micro_batch_sizes": [4, 1]}})
    res = CliRunner().invoke(main, ["estimate", cfg_path, "--nnodes", "1", "--gpus-per-node", "2", "--trace",
                                    "--forecast"])
    assert res.exit_code == 0, res.output
    out = res.output
    cfg = load_config(cfg_path, [])
    plans = trace.plan_ranks(cfg, 2, 2)
    assert [(p.rows, p.width) for p in plans] == [(4, plans[0].width), (1, plans[1].width)]
    hf = trace.load_hf_config(cfg)
    shapes = trace.forecast_shapes(cfg, plans)
    peaks = {r: trace.trace_rank(cfg, hf, 2, 2, r, shapes[r], 80 << 30, "cpu") for r in range(2)}
    for r, tr in peaks.items():
        pk = tr.peak
        assert f"rank {r}: traced peak {format_bytes(pk.total)} at {pk.label};" in out
        for c in ("parameters (sharded)", "optimizer state", "activations"):
            assert f"  {c:<24} {format_bytes(pk.by_category[c]):>14} {format_bytes(tr.category_max(c)):>12}" in out
        p = plans[r]
        assert (f"{r:>4} {f'{p.rows} x {p.width}':>12} {f'{p.step} #{p.micro}':>8} {p.tokens:>13,} "
                f"{format_bytes(pk.total):>15}") in out
    ratio = peaks[0].peak.total / ((peaks[0].peak.total + peaks[1].peak.total) / 2)
    assert peaks[0].peak.total > peaks[1].peak.total
    assert f"imbalance: max/median predicted peak = {ratio:.2f}; rank 0 peaks at step {plans[0].step}" in out
    assert "\nparallel.compile: traced eager (the tracker does not see inside compiled graphs; " in out


def test_what_the_tracker_cannot_trace_is_refused_in_one_line(tmp_path):
    off = _config(tmp_path, "off", {"parallel": {"cpu_offload": True}})
    res = CliRunner().invoke(main, ["estimate", off, "--trace"])
    assert res.exit_code == 2
    assert res.output == ("fsdptrain: error: parallel.cpu_offload: --trace cannot trace it (the fake trace runs on "
                          "one device, so offloaded and resident memory cannot be told apart); trace with "
                          "parallel.cpu_offload=false, or drop --trace for the analytic estimate, which covers it\n")
