"""Memory observability: per-rank phase records, imbalance, report, snapshots, OOM stop, estimator.

One 3-rank torchrun launch (tests/workers/mem_cases.py) runs: a training run where the
last rank gets 32x the tokens of the others, the real shard sizes for the
estimator check, and finally a simulated out-of-memory error on rank 1 (which
ends the launch). Everything else runs in this process.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from fsdptrain.cli import main as cli
from fsdptrain.config.schema import load_config
from fsdptrain.core.errors import ConfigError, UserError
from fsdptrain.core.units import GIB, format_bytes
from fsdptrain.memory import diff, estimate, report, snapshot
from fsdptrain.memory import stats as memstats
from fsdptrain.memory.tracker import likely_cause
from tests.helpers import REPO, first_block_saved_bytes, torchrun
from tests.workers.mem_cases import LONG, SHORT, measure_model_state

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048, "vocab_size": 100}
# Dimensions that do not divide by 3 ranks, so FSDP pads some shards.
UNEVEN = {"model_type": "llama", "hidden_size": 56, "intermediate_size": 100, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "vocab_size": 101,
          "tie_word_embeddings": False}
PER_STEP = ["step_start", "forward:model.layers.0", "forward:model.layers.1", "forward",
            "backward:model.layers.1", "backward:model.layers.0", "backward", "optimizer"]


def _write(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    root = tmp_path_factory.mktemp("mem")
    train = _write(root / "train.yaml", {
        "output_dir": str(root / "run"), "seed": 3, "model": {"hf_config": TINY, "attn_implementation": "eager"},
        "data": {"max_length": 2048, "shuffle": False}, "train": {"max_steps": 4, "micro_batch_size": 1},
        "parallel": {"device": "cpu", "precision": "fp32"},
        "logging": {"log_every": 2, "tensorboard": True, "progress": "lines"},
        "memory": {"per_module": True, "imbalance_warn": 1.05}})
    state = _write(root / "state.yaml", {"seed": 1, "model": {"hf_config": UNEVEN},
                                         "parallel": {"device": "cpu", "precision": "fp32"}})
    oom = _write(root / "oom.yaml", {
        "output_dir": str(root / "oomrun"), "model": {"hf_config": TINY},
        "data": {"synthetic_examples": 48, "max_length": 48}, "train": {"max_steps": 4},
        "parallel": {"device": "cpu", "precision": "fp32"}, "logging": {"tensorboard": False, "progress": "none"}})
    spec = {"train": [train], "model_state": {"config": state, "out": str(root / "state")},
            "oom": {"config": oom, "rank": 1, "at_call": 2}}
    (root / "spec.json").write_text(json.dumps(spec))
    t0 = time.perf_counter()
    proc = torchrun(3, ["-m", "tests.workers.mem_cases", str(root / "spec.json")], timeout=400)
    return root, proc, time.perf_counter() - t0


def _records(run: Path, rank: int) -> list[dict]:
    return [json.loads(x) for x in (run / "memory" / f"rank{rank}.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- the launched run


def test_every_rank_records_every_phase_and_block(launch):
    root, proc, _ = launch
    assert (root / "run" / "metrics.jsonl").is_file(), proc.stderr[-3000:]
    for rank in range(3):
        recs = _records(root / "run", rank)
        assert [r["phase"] for r in recs] == PER_STEP * 4
        assert [r["step"] for r in recs] == [s for s in range(1, 5) for _ in PER_STEP]
        assert set(memstats.SCHEMA) <= set(recs[0])
        assert all(r["allocated_peak"] >= r["allocated"] > 0 for r in recs)
        want = LONG if rank == 2 else SHORT
        assert {r["batch_tokens"] for r in recs} == {want} and {r["longest"] for r in recs} == {want}
        assert {r["tokens"] for r in recs} == {want}  # one example of exactly `want` tokens per step
        assert [r["micro"] for r in recs[:8]] == [None, 0, 0, 0, 0, 0, 0, None]
    peak = [max(r["allocated_peak"] for r in _records(root / "run", k)) for k in range(3)]
    assert peak[2] > 1.05 * max(peak[:2])  # the long sequences' s x s attention scores show in RSS


def _intervals(metrics: list[dict]) -> list[tuple[int, ...]]:
    """The steps each gather covers: from the step after the previous log step to the log step."""
    out, prev = [], 0
    for m in metrics:
        out.append(tuple(range(prev + 1, m["step"] + 1)))
        prev = m["step"]
    return out


def test_imbalance_warning_names_rank_phase_and_token_ratio(launch):
    root, proc, _ = launch
    warnings = [x for x in proc.stdout.splitlines() if x.startswith("memory imbalance")]
    metrics = [json.loads(x) for x in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics][-2:] == [2, 4]  # log_every 2 (the trainer may also log step 1)
    assert len(warnings) == len(metrics), (proc.stdout[-3000:], metrics)
    assert warnings[0].startswith(f"memory imbalance at step {metrics[0]['step']}: rank 2 peaked at ")
    assert "likely cause: rank 2's micro-batch had 48.0x the median's tokens (1,536 vs 32 padded tokens)" in warnings[0]
    assert [m["peak_mem_rank_of_max"] for m in metrics] == [2] * len(metrics), metrics
    recs = [_records(root / "run", k) for k in range(3)]
    for m, steps in zip(metrics, _intervals(metrics)):
        peaks = [max(r["allocated_peak"] for r in rs if r["step"] in steps) for rs in recs]
        assert m["peak_mem_gib_max"] == pytest.approx(max(peaks) / GIB, rel=1e-12)
        assert m["mem_imbalance"] == pytest.approx(max(peaks) / sorted(peaks)[1], rel=1e-12)


def test_tensorboard_gets_per_rank_peaks(launch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = launch[0]
    metrics = [json.loads(x) for x in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(root / "run" / "tb"))
    acc.Reload()
    for rank in range(3):
        recs = _records(root / "run", rank)
        events = acc.Scalars(f"memory/rank{rank}/peak_allocated_gib")
        assert [e.step for e in events] == [m["step"] for m in metrics]
        for e, steps in zip(events, _intervals(metrics)):
            want = max(r["allocated_peak"] for r in recs if r["step"] in steps) / GIB
            assert e.value == pytest.approx(want, rel=1e-6)
        assert [e.value for e in acc.Scalars(f"memory/rank{rank}/alloc_retries")] == [0] * len(metrics)


def test_report_table_imbalance_and_plot(launch, tmp_path):
    root = launch[0]
    png = tmp_path / "mem.png"
    res = CliRunner().invoke(cli, ["mem", "report", str(root / "run"), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    rows = {int(x.split()[0]): x.split() for x in res.output.splitlines() if x[:4].strip().isdigit()}
    assert sorted(rows) == [0, 1, 2]
    recs = _records(root / "run", 2)
    top = max(recs, key=lambda r: r["allocated_peak"])
    assert rows[2][1] == f"{top['allocated_peak'] / GIB:.3f}" and rows[2][-2] == "1,536"
    assert "imbalance: max/median peak allocated = " in res.output and "(rank 2:" in res.output
    assert "likely cause: rank 2's batch at its peak had 48.0x the median's tokens" in res.output
    from PIL import Image

    img = Image.open(png).convert("RGB")
    assert img.size == (1200, 600)
    colors = {c for _, c in img.getcolors(maxcolors=1 << 20)}
    assert all(c in colors for c in report.COLORS[:3])  # one line per rank


def test_model_state_terms_equal_the_real_shards(launch, tmp_path):
    root = launch[0]
    cfg_path = root / "state.yaml"
    shape = estimate.shape_from_config(load_config(str(cfg_path)))
    measured = [json.loads((root / "state" / f"rank{r}.json").read_text()) for r in range(3)]
    from fsdptrain.dist import distributed

    info = distributed.init("cpu")  # a 1-rank group in this process: world size 1
    try:
        measured.append(measure_model_state(str(cfg_path), info))
    finally:
        distributed.shutdown(info)
    for m in measured:
        est = estimate.model_state(shape, m["world"], m["rank"], 4)
        assert est.local_numel == m["params_local"] == m["grads_local"]
        assert (est.params, est.grads, est.optimizer) == (m["params_storage"], m["grads_storage"], m["optimizer_bytes"])
        assert est.n_tensors == m["n_tensors"]
    assert measured[2]["params_local"] < measured[0]["params_local"]  # the padding case is exercised
    assert measured[3]["params_local"] == shape.n_params


def test_cpu_offload_host_bytes_are_fsdp2s_pinned_shards_and_gradients(launch):
    """parallel.cpu_offload's host line against FSDP2's own shards on 3 ranks (padded ones included): each
    parameter's padded shard and each gradient's unpadded shard, every one a pinned request that CUDA's host
    allocator rounds up to a power of two (ATen's CachingHostAllocator, default pinned_max_round_threshold)."""
    from fsdptrain.train import staging

    root = launch[0]
    cfg = load_config(str(root / "state.yaml"), ["parallel.cpu_offload=true"])
    shape = estimate.shape_from_config(cfg)
    for r in range(3):
        m = json.loads((root / "state" / f"rank{r}.json").read_text())
        pinned = sum(staging.pinned_size(b) for b in m["param_storages"] + m["grad_bytes"])
        assert estimate.cpu_offload_pinned_bytes(shape, 3, r, 4, 4, True) == pinned
        assert estimate.cpu_offload_pinned_bytes(shape, 3, r, 4, 4, False) == \
            sum(m["param_storages"]) + sum(m["grad_bytes"]) == m["params_storage"] + 4 * m["grads_local"]
        est = estimate.compute(shape, estimate.settings_from_config(cfg, 1, 3, 80 * GIB, device_type="cuda"), r)
        assert est.cpu_per_rank == pinned + m["optimizer_bytes"]  # the moments unpinned, exact
        assert pinned > m["params_storage"] + 4 * m["grads_local"]  # the rounding is exercised


def test_oom_on_one_rank_stops_all_with_one_message(launch):
    root, proc, seconds = launch
    assert proc.returncode != 0
    errors = [x for x in proc.stderr.splitlines() if x.startswith("fsdptrain: error:")]
    mem = root / "oomrun" / "memory"
    assert errors == [f"fsdptrain: error: rank 1 ran out of memory at step 2 (forward of micro-batch 0); "
                      f"post-mortem: {mem / 'oom_rank1.txt'}, {mem / 'oom_rank1_stats.json'}"], proc.stderr[-3000:]
    assert "fsdptrain/trainer.py" not in proc.stderr  # no worker traceback from the other ranks
    assert seconds < 300  # well before the 30-minute collective timeout
    post = json.loads((mem / "oom_rank1_stats.json").read_text())
    assert post["rank"] == 1 and post["step"] == 2
    shape = estimate.shape_from_config(load_config(str(root / "oom.yaml")))
    exact = estimate.model_state(shape, 3, 1, 4)
    assert post["owners"] == {"parameters (sharded)": exact.params, "parameters (gathered)": 0,  # before forward
                              "gradients": 0,  # zero_grad(set_to_none) ran after step 1
                              "optimizer state": exact.optimizer, "activations": 0, "other": 0}
    text = (mem / "oom_rank1.txt").read_text()
    assert "rank 1, step 2, forward of micro-batch 0" in text
    assert "  11.00 KiB  parameters (sharded)  model.layers.1.mlp.down_proj.weight (local shard)" in text
    assert "  11.00 KiB  optimizer state       exp_avg of model.layers.0.mlp.down_proj.weight" in text
    assert not (root / "oomrun" / "memory" / "oom_rank0.txt").exists()


def test_watchdog_stops_a_rank_blocked_in_a_collective(tmp_path):
    # NCCL collectives do not fail when a peer stops; the store key is what frees the waiting ranks.
    (tmp_path / "spec.json").write_text(json.dumps({"watchdog": str(tmp_path / "run")}))
    t0 = time.perf_counter()
    proc = torchrun(2, ["-m", "tests.workers.mem_cases", str(tmp_path / "spec.json")], timeout=100)
    assert time.perf_counter() - t0 < 90  # rank 1 sleeps 120 s: only rank 0's quiet exit ended the launch
    assert proc.returncode != 0 and "still running" not in proc.stdout
    assert re.search(r"rank\s*: 0 \(local_rank: 0\)\s*exitcode\s*: 1 ", proc.stderr), proc.stderr[-2000:]
    assert "[rank0]: Traceback" not in proc.stderr  # a quiet exit, not an error of its own


# ----------------------------------------------------------------------------- stats and causes


def test_cuda_stats_map_to_the_schema():
    raw = {"allocated_bytes.all.current": 10, "allocated_bytes.all.peak": 50, "reserved_bytes.all.current": 64,
           "reserved_bytes.all.peak": 96, "active_bytes.all.current": 12, "active_bytes.all.peak": 52,
           "inactive_split_bytes.all.current": 3, "inactive_split_bytes.all.peak": 7,
           "num_alloc_retries": 2, "num_ooms": 1, "allocated_bytes.large_pool.peak": 999}
    assert memstats.from_cuda_stats(raw) == {
        "allocated": 10, "allocated_peak": 50, "reserved": 64, "reserved_peak": 96, "active": 12, "active_peak": 52,
        "inactive_split": 3, "inactive_split_peak": 7, "num_alloc_retries": 2, "num_ooms": 1}


def test_cpu_peak_resets_per_phase():
    memstats.reset_peak(torch.device("cpu"))
    big = torch.ones(256 * 2**20 // 4)  # 256 MiB touched
    del big
    a = memstats.sample(torch.device("cpu"))
    memstats.reset_peak(torch.device("cpu"))
    b = memstats.sample(torch.device("cpu"))
    assert a["allocated_peak"] - a["allocated"] > 200 * 2**20
    assert b["allocated_peak"] - b["allocated"] < 50 * 2**20
    assert memstats.from_proc_status("VmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n")["reserved_peak"] == 2048 * 1024


def test_cuda_records_carry_the_hosts_resident_memory_with_its_own_per_phase_peak(monkeypatch):
    """A stand-in CUDA device (the allocator's statistics given): the record has the allocator's fields and the
    process's resident host memory, whose peak reset_peak starts again as on CPU."""
    raw = {"allocated_bytes.all.current": 10, "allocated_bytes.all.peak": 50}
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: raw)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    cuda = torch.device("cuda")
    memstats.reset_peak(cuda)
    big = torch.ones(256 * 2**20 // 4)  # 256 MiB touched
    del big
    a = memstats.sample(cuda)
    memstats.reset_peak(cuda)
    b = memstats.sample(cuda)
    assert set(a) == set(memstats.SCHEMA) | set(memstats.HOST_FIELDS)
    assert a["allocated"] == 10 and a["allocated_peak"] == 50  # the allocator's, not the host's
    cpu = memstats.sample(torch.device("cpu"))  # the same process's resident set, read the CPU way
    assert abs(b["host_rss"] - cpu["allocated"]) < 16 * 2**20
    assert a["host_rss_peak"] - b["host_rss_peak"] > 200 * 2**20  # the freed 256 MiB left the new interval's peak


def test_report_shows_the_host_peak_per_rank_when_recorded(tmp_path):
    rows = {0: [_row(phase="forward", host_rss_peak=3 * GIB), _row(phase="optimizer", host_rss_peak=5 * GIB)],
            1: [_row(phase="forward", host_rss_peak=4 * GIB)]}
    text = report.render("run", rows).splitlines()
    assert text[1].endswith("longest host peak GiB") and text[2].endswith(" 5.000") and text[3].endswith(" 4.000")
    assert "host peak" not in report.render("run", {0: [_row(phase="forward")]})  # CPU records: the RSS is the peak


def _row(**kw):
    base = {"allocated_peak": 10 * GIB, "reserved_peak": 11 * GIB, "inactive_split_peak": 0, "num_alloc_retries": 0,
            "num_ooms": 0, "step": 5, "phase": 2, "module": -1, "micro": 0, "batch_tokens": 1000, "longest": 1000}
    return {**base, **kw}


def test_likely_cause_names_tokens_sequence_fragmentation_or_rank0():
    rows = [_row(), _row(batch_tokens=3100), _row(batch_tokens=900)]
    assert likely_cause(rows, 1).startswith("rank 1's micro-batch had 3.1x the median's tokens (3,100 vs 1,000")
    rows = [_row(longest=512), _row(longest=2048), _row(longest=512)]
    assert likely_cause(rows, 1).startswith("rank 1 had the longest sequence (2,048 vs median 512")
    rows = [_row(), _row(num_alloc_retries=7), _row()]
    assert "allocator retries on rank 1 (7" in likely_cause(rows, 1)
    assert "rank 0's extra work" in likely_cause([_row(), _row(), _row()], 0)


def test_snapshot_steps_must_be_step_numbers(tmp_path):
    with pytest.raises(ConfigError,
                       match=r"memory.snapshot_steps: expected optimizer steps \(integers >= 1\), got \[0\]"):
        load_config(None, ["memory.snapshot_steps=[0, 3]"])


# ----------------------------------------------------------------------------- snapshots and diff


def _fr(f, line, name):
    return {"filename": f, "line": line, "name": name}


MODEL_FR = [_fr("/x/site-packages/torch/nn/modules/linear.py", 125, "forward"),
            _fr("/x/site-packages/transformers/models/llama/modeling_llama.py", 200, "forward")]
OPT_FR = [_fr("/x/site-packages/torch/optim/adamw.py", 90, "_init_group"),
          _fr("/w/fsdptrain/trainer.py", 187, "_train")]
LOSS_FR = [_fr("/w/fsdptrain/trainer.py", 63, "token_loss_sum")]


def _snap(live, trace):
    blocks = [{"address": a, "size": s, "requested_size": s, "state": "active_allocated", "frames": f}
              for a, s, f in live]
    blocks.append({"address": 999_000, "size": 4096, "requested_size": 0, "state": "inactive", "frames": []})
    return {"segments": [{"address": 0, "total_size": 2**30, "blocks": blocks}], "device_traces": [trace]}


def _ev(action, addr, size, frames=()):
    return {"action": action, "addr": addr, "size": size, "frames": list(frames), "stream": 0}


def test_live_at_peak_replays_the_trace_backwards():
    # params (100) allocated before the trace; then logits 500 and activation 300 come and go
    snap = _snap([(0, 100, []), (5000, 40, OPT_FR)],
                 [_ev("alloc", 1000, 300, MODEL_FR), _ev("alloc", 2000, 500, LOSS_FR),
                  _ev("free_requested", 2000, 500), _ev("free_completed", 2000, 500, LOSS_FR),
                  _ev("free_completed", 1000, 300, MODEL_FR), _ev("alloc", 5000, 40, OPT_FR)])
    blocks, peak = snapshot.live_at_peak(snap)
    assert peak == 900 and sorted(b.addr for b in blocks) == [0, 1000, 2000]
    assert snapshot.site(MODEL_FR) == "transformers/models/llama/modeling_llama.py:200 (forward)"
    assert snapshot.site([]).startswith("<no Python stack")


def test_live_at_peak_replays_the_ranks_own_device_trace(tmp_path):
    """Rank 1 of a node records into device_traces[1]; device 0's trace is empty there (or holds a stray event
    from another process's context). The peak is rank 1's, read from the device its segments are on."""
    trace = [_ev("alloc", 1000, 300, MODEL_FR), _ev("alloc", 2000, 500, LOSS_FR),
             _ev("free_completed", 2000, 500, LOSS_FR), _ev("free_completed", 1000, 300, MODEL_FR)]
    one = _snap([(0, 100, OPT_FR)], [])
    one["segments"][0]["device"] = 1
    one["device_traces"] = [[], trace]
    blocks, peak = snapshot.live_at_peak(one)
    assert peak == 900 and sorted(b.addr for b in blocks) == [0, 1000, 2000]
    stray = {**one, "device_traces": [[_ev("alloc", 7000, 64)], trace]}
    assert snapshot.live_at_peak(stray)[1] == 900
    no_segments = {"segments": [], "device_traces": [[], trace]}  # nothing live at the dump: first non-empty trace
    assert snapshot.live_at_peak(no_segments)[1] == 800
    # `mem diff` compares each snapshot at its own rank's peak
    zero = _snap([(0, 100, OPT_FR)], trace)
    rows, peak_a, peak_b = diff.diff(zero, one)
    assert (peak_a, peak_b) == (900, 900) and all(r.delta == 0 for r in rows)


def test_grouping_by_owner_uses_addresses_then_stacks():
    ranges = [(0, 100, "parameters (sharded)", "w (local shard)"), (200, 260, "gradients", "grad of w"),
              (600, 650, "parameters (gathered)", "w (gathered)")]
    gather_fr = [_fr("/x/site-packages/torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py", 300,
                     "foreach_all_gather")]
    blocks = [snapshot.Block(0, 100), snapshot.Block(200, 60), snapshot.Block(300, 80, OPT_FR),
              snapshot.Block(400, 30, MODEL_FR), snapshot.Block(500, 7), snapshot.Block(600, 50),
              snapshot.Block(700, 20, gather_fr)]
    g = snapshot.group(blocks, ranges)
    assert {k: v["bytes"] for k, v in g.items()} == {"parameters (sharded)": 100, "parameters (gathered)": 70,
                                                      "gradients": 60, "optimizer state": 80, "activations": 30,
                                                      "other": 7}
    text = snapshot.postmortem_text(3, 7, "backward of micro-batch 1", "CUDA out of memory. Tried",
                                    {"allocated": 277, "reserved": 2**31}, g)
    assert "rank 3, step 7, backward of micro-batch 1" in text and "reserved 2.00 GiB" in text
    assert "      100 B  parameters (sharded)  w (local shard)" in text


def test_diff_orders_sites_by_difference(tmp_path):
    a = _snap([(0, 100, OPT_FR), (1000, 3 * 2**20, LOSS_FR)], [])
    b = _snap([(0, 100, OPT_FR), (1000, 2**20, LOSS_FR), (3000, 2**19, MODEL_FR)], [])
    rows, pa, pb = diff.diff(a, b)
    assert (pa, pb) == (100 + 3 * 2**20, 100 + 2**20 + 2**19)
    assert [(r.site, r.delta) for r in rows] == [("/w/fsdptrain/trainer.py:63 (token_loss_sum)", 2 * 2**20),
                                                 ("transformers/models/llama/modeling_llama.py:200 (forward)", -2**19),
                                                 ("/w/fsdptrain/trainer.py:187 (_train)", 0)]
    for name, snap in (("a.pickle", a), ("b.pickle", b)):
        (tmp_path / name).write_bytes(pickle.dumps(snap))
    res = CliRunner().invoke(cli, ["mem", "diff", str(tmp_path / "a.pickle"), str(tmp_path / "b.pickle")])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[5].split() == ["3.0", "1.0", "+2.0", "/w/fsdptrain/trainer.py:63",
                                                  "(token_loss_sum)"]


def test_snapshot_loader_refuses_code(tmp_path):
    bad = tmp_path / "bad.pickle"
    bad.write_bytes(pickle.dumps({"segments": [], "x": io.BytesIO}))
    with pytest.raises(UserError, match="refusing to load _io.BytesIO"):
        snapshot.load(bad)
    res = CliRunner().invoke(cli, ["mem", "diff", str(bad), str(bad)])
    assert res.exit_code == 2 and "fsdptrain: error:" in res.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="allocation history needs CUDA")
def test_cuda_snapshot_round_trip(tmp_path):
    snapshot.start_recording(10000)
    try:
        x = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
        y = torch.empty(32 * 2**20, dtype=torch.uint8, device="cuda")
        del y
        snapshot.dump(tmp_path / "s.pickle")
    finally:
        snapshot.stop_recording()
    blocks, peak = snapshot.live_at_peak(snapshot.load(tmp_path / "s.pickle"))
    sites = snapshot.by_site(blocks)
    assert peak >= 96 * 2**20
    assert any("test_memory.py" in s for s in sites), sites
    del x


# ----------------------------------------------------------------------------- estimator


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_block_activations_equal_autograd_saved_tensors(attn):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(UNEVEN)
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32).train()
    b, s = 2, 40
    saved = first_block_saved_bytes(model, b, s)
    shape = estimate.shape_of_model(model)
    assert estimate.block_activation_bytes_per_token(shape, 4, attn, s) * b * s == saved


def test_qwen25_32b_on_2x8_with_and_without_offload():
    path = str(REPO / "configs" / "estimate-qwen2.5-32b-2x8-offload.yaml")
    cfg = load_config(path)
    shape = estimate.shape_from_config(cfg)
    h, f, kv, v, L = 5120, 27648, 1024, 152064, 64
    per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * f + 2 * h
    assert shape.n_params == L * per_layer + 2 * v * h + h == 32_763_876_352
    off = estimate.estimate(cfg, 2, 8, 80 * GIB, 1024 * GIB, shape=shape)
    st = estimate.model_state(shape, 16, 0, 4)
    # on the host: the shards and gradients pinned one by one (each rounded to a power of two), AdamW's state
    pinned = estimate.cpu_offload_pinned_bytes(shape, 16, 0, 4, 2, True)
    assert (off.fits and off.cpu_per_node == 8 * (pinned + st.optimizer)
            and off.terms["parameters (sharded)"] == 0)
    assert round(off.cpu_per_node / GIB) == 342 and round(8 * st.total / GIB) == 244  # the rounding: +40%
    assert st.params == st.padded_numel * 4 and st.total == pytest.approx(16 * shape.n_params / 16, rel=0.01)
    plain = estimate.estimate(load_config(path, ["parallel.cpu_offload=false",
                                                 "parallel.activation_checkpointing=none"]),
                              2, 8, 80 * GIB, shape=shape)
    assert not plain.fits and plain.terms["optimizer state (AdamW m, v, step)"] == st.optimizer
    assert plain.peak > 80 * GIB
    assert any(a.startswith("parallel.activation_checkpointing=full:") and a.endswith("fits") for a in plain.advice)
    text = estimate.render(plain)
    assert "verdict: does NOT fit" in text and "what to change" in text


def test_estimate_cli(tmp_path):
    cfg = _write(tmp_path / "c.yaml", {"model": {"hf_config": TINY}, "data": {"max_length": 128}})
    res = CliRunner().invoke(cli, ["estimate", cfg, "train.micro_batch_size=4", "--nnodes", "1", "--gpus-per-node", "2",
                                   "--gpu-memory", "8GiB"])
    assert res.exit_code == 0, res.output
    assert "run: 1 node(s) x 2 GPUs = 2 ranks, precision bf16-mixed, micro-batch 4 x 128 tokens" in res.output
    assert "verdict: fits" in res.output
    res = CliRunner().invoke(cli, ["estimate", cfg, "--gpu-memory", "huge"])
    assert res.exit_code == 2 and "--gpu-memory: 'huge' is not a size" in res.output


def test_estimate_cli_preference_runs(tmp_path):
    """dpo: a micro-batch of 2 pairs is 4 rows; full fine-tuning names its reference copy and prints its weights
    (bf16 under bf16-mixed: half the policy's fp32 shards, on a world of 2 with even shards) and its forward
    phase; LoRA's reference is the policy; orpo has none; rm's row count doubles the same way."""
    cfg = _write(tmp_path / "c.yaml", {"model": {"hf_config": TINY}, "data": {"max_length": 128},
                                       "train": {"objective": "dpo", "micro_batch_size": 2}})
    args = ["--nnodes", "1", "--gpus-per-node", "2", "--gpu-memory", "8GiB"]
    res = CliRunner().invoke(cli, ["estimate", cfg, *args])
    assert res.exit_code == 0, res.output
    assert "micro-batch 4 x 128 tokens (2 pairs), grad accumulation 1" in res.output
    assert "\nobjective: dpo (sigmoid), reference model: a frozen sharded copy (full fine-tuning)\n" in res.output
    est = estimate.estimate(load_config(cfg), 1, 2, 8 * GIB)
    ref = est.terms["reference weights (sharded, frozen)"]
    assert ref * 2 == est.terms["parameters (sharded)"]
    assert f"  {'reference weights (sharded, frozen)':<44} {format_bytes(ref):>12}" in res.output
    assert "  forward (reference, no grad)" in res.output
    # the advice leaves out what dpo refuses (the chunked loss), and halves pairs, not rows
    tight = CliRunner().invoke(cli, ["estimate", cfg, "data.max_length=2048", "--gpu-memory", "1GiB", *args[:4]])
    assert "what to change (each alone):" in tight.output and "loss_chunk_tokens" not in tight.output
    assert "  train.micro_batch_size=1 train.grad_accum_steps=2: peak" in tight.output
    res = CliRunner().invoke(cli, ["estimate", cfg, "finetune.method=lora", *args])
    assert "reference model: the policy with its adapters off (no second copy)" in res.output
    assert "reference weights" not in res.output and "  forward (reference, no grad)" in res.output
    # another folder as the reference: a frozen copy under LoRA too
    res = CliRunner().invoke(cli, ["estimate", cfg, "finetune.method=lora", "preference.ref_model=refs/sft", *args])
    assert "reference model: a frozen sharded copy of refs/sft (preference.ref_model)\n" in res.output
    assert f"  {'reference weights (sharded, frozen)':<44}" in res.output
    res = CliRunner().invoke(cli, ["estimate", cfg, "preference.loss=orpo", *args])
    assert "objective: dpo (orpo), reference model: none\n" in res.output
    assert "reference" not in res.output.replace("reference model: none", "")
    res = CliRunner().invoke(cli, ["estimate", cfg, "train.objective=rm", *args])
    assert "micro-batch 4 x 128 tokens (2 pairs)" in res.output and "objective: rm, reference model: none" in res.output


# ----------------------------------------------------------------------------- CUDA only (skipped on CPU)


def _fixed(n: int, seq: int):
    from fsdptrain.data.encode import IGNORE, Example

    return [Example([(3 * i + k) % 90 + 4 for k in range(seq)],
                    [IGNORE] + [(3 * i + k) % 90 + 4 for k in range(1, seq)])
            for i in range(n)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA allocator records and snapshots need a GPU")
def test_cuda_run_records_allocator_stats_and_snapshot(tmp_path):
    from fsdptrain.trainer import train

    cfg = load_config(None, [f"output_dir={tmp_path}", "train.max_steps=3", "train.micro_batch_size=2",
                             "data.max_length=256", "logging.tensorboard=false", "logging.progress=none",
                             "memory.snapshot_steps=[2]", "parallel.device=cuda"])
    cfg.model.hf_config = dict(TINY)
    train(cfg, examples=_fixed(8, 256))
    recs = _records(tmp_path, 0)
    assert [r["phase"] for r in recs] == ["step_start", "forward", "backward", "optimizer"] * 3
    assert all(r["reserved"] >= r["allocated"] > 0 and r["allocated_peak"] >= r["allocated"] for r in recs)
    fwd = [r for r in recs if r["phase"] == "forward"]
    assert all(r["allocated"] > recs[0]["allocated"] for r in fwd)  # activations live after forward
    snap = snapshot.load(tmp_path / "memory" / "snapshot_step2_rank0.pickle")
    blocks, peak = snapshot.live_at_peak(snap)
    assert peak >= max(r["allocated_peak"] for r in recs if r["step"] == 2) * 0.5 and blocks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a real CUDA out-of-memory error needs a GPU")
def test_cuda_oom_post_mortem(tmp_path):
    from fsdptrain.core.errors import TrainingError
    from fsdptrain.trainer import train

    big_vocab = {**TINY, "vocab_size": 151936}
    cfg = load_config(None, [f"output_dir={tmp_path}", "train.max_steps=1", "train.micro_batch_size=128",
                             "data.max_length=4096", "logging.tensorboard=false", "logging.progress=none",
                             "parallel.device=cuda"])
    cfg.model.hf_config = big_vocab  # 128 x 4096 x 151936 logits cannot fit on any GPU
    with pytest.raises(TrainingError,
                       match=r"rank 0 ran out of memory at step 1 \(forward of micro-batch 0\); post-mortem: "):
        train(cfg, examples=_fixed(128, 4096))
    mem = tmp_path / "memory"
    post = json.loads((mem / "oom_rank0_stats.json").read_text())
    shape = estimate.shape_from_config(cfg)
    exact = estimate.model_state(shape, 1, 0, 4)
    # fp32 shards (FSDP's own records), whatever units were unsharded at the OOM (the root: in lm_head)
    assert exact.params <= post["owners"]["parameters (sharded)"] <= exact.params + 512 * exact.n_tensors
    assert post["owners"]["parameters (gathered)"] > 0
    assert post["memory_stats"]["num_ooms"] >= 1
    assert "live memory by owner:" in (mem / "oom_rank0.txt").read_text()
    assert snapshot.live_blocks(snapshot.load(mem / "oom_rank0.pickle"))


def test_estimate_from_a_model_folder_reads_only_its_config(tmp_path):
    from tests.helpers import LLAMA, make_model_dir

    folder = make_model_dir(tmp_path / "m", LLAMA)
    for f in folder.glob("*.safetensors"):
        f.unlink()  # no weights needed: the model is built on the meta device
    cfg = load_config(None, [f"model.path={folder}"])
    shape = estimate.shape_from_config(cfg)
    from transformers import AutoConfig, AutoModelForCausalLM

    real = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)))
    assert shape.n_params == sum(p.numel() for p in real.parameters())
    assert shape.lm_head_numel == 0 and shape.layers == LLAMA["num_hidden_layers"]  # tied embeddings


def test_estimate_follows_hybrid_sharding_optimizer_offload_and_loss_chunks(tmp_path):
    cfg_path = _write(tmp_path / "c.yaml", {"model": {"hf_config": {**TINY, "vocab_size": 32000}},
                                             "data": {"max_length": 4096}})
    shape = estimate.shape_from_config(load_config(cfg_path))
    base = estimate.estimate(load_config(cfg_path), 2, 4, 80 * GIB, shape=shape)
    assert base.state == estimate.model_state(shape, 8, 0, 4)
    hybrid = estimate.estimate(load_config(cfg_path, ["parallel.sharding=hybrid"]), 2, 4, 80 * GIB, shape=shape)
    assert hybrid.state == estimate.model_state(shape, 4, 0, 4)  # sharded within a node only
    off = estimate.estimate(load_config(cfg_path, ["parallel.optimizer_offload=true"]), 2, 4, 80 * GIB, shape=shape)
    assert off.terms["optimizer state (AdamW m, v, step)"] == 0 and off.cpu_per_rank > base.state.optimizer
    assert base.peak - off.peak == base.state.optimizer
    chunk = estimate.estimate(load_config(cfg_path, ["train.loss_chunk_tokens=512"]), 2, 4, 80 * GIB, shape=shape)
    tokens, V, h, c = base.settings.micro_batch * 4096, 32000, TINY["hidden_size"], 2
    assert base.terms["logits + loss (forward)"] == tokens * V * (c + 4 + 4)  # bf16 logits, fp32 copy, log-softmax
    assert chunk.terms["logits + loss (forward)"] == 512 * V * (c + 4)  # one chunk: bf16 logits + fp32 softmax
    assert chunk.terms["logits + loss (backward)"] == 0  # the fused loss made its gradients in forward
    assert chunk.terms["lm_head + hidden grads (fused loss)"] == c * V * h + c * h * tokens
    assert chunk.peak < base.peak


def test_estimate_settings_follow_packing_and_token_budget(tmp_path):
    cfg_path = _write(tmp_path / "c.yaml", {"model": {"hf_config": TINY}, "data": {"max_length": 4096}})
    s = estimate.settings_from_config(load_config(cfg_path), 1, 2, 80 * GIB)
    assert (s.micro_batch, s.seq_len) == (load_config(cfg_path).train.micro_batch_size, 4096)
    s = estimate.settings_from_config(load_config(cfg_path, ["data.packing=true", "data.pack_length=1024"]), 1, 2, 1)
    assert s.seq_len == 1024
    s = estimate.settings_from_config(load_config(cfg_path, ["data.max_length=2048", "data.token_budget=8192"]),
                                      1, 2, 1)
    assert (s.micro_batch, s.seq_len) == (4, 2048)


def test_oom_attribution_uses_fsdps_sharded_and_gathered_parameters():
    """In the middle of forward FSDP2 has swapped the registered parameters of the unsharded units (the root and
    the block running) for their all-gathered bf16 copies: the post-mortem must count every fp32 shard as
    "parameters (sharded)" and the gathered copies apart, as "parameters (gathered)"."""
    from fsdptrain.dist import distributed
    from fsdptrain.model import models
    from fsdptrain.train.build import build_sharded_model

    cfg = load_config(None, ["parallel.device=cpu", "parallel.precision=bf16-mixed", "parallel.prefetch_blocks=0"])
    cfg.model.hf_config = dict(UNEVEN)
    info = distributed.init("cpu")
    try:
        hf = models.load_hf_config(None, cfg.model.hf_config, None, False)
        sharded = build_sharded_model(cfg, info, hf)
        model, blocks = sharded.model, sharded.blocks
        seen = {}

        def attribute(module, args, output):  # inside block 0: root and block 0 unsharded, block 1 sharded
            seen["groups"] = snapshot.group([snapshot.Block(s, e - s) for s, e, _, _ in
                                             snapshot.owner_ranges(model, None)], snapshot.owner_ranges(model, None))
            seen["names"] = {n for _, _, _, n in snapshot.owner_ranges(model, None)}

        hook = blocks[0].mlp.register_forward_hook(attribute)
        model(input_ids=torch.tensor([[1, 2, 3, 4, 5, 6]]), use_cache=False).logits.sum().backward()
        hook.remove()
        numel = {n: p.numel() for n, p in model.named_parameters()}  # after backward: the sharded parameters again
        in_block = lambda n, i: n.startswith(f"model.layers.{i}.")  # noqa: E731
        owners = {o: g["bytes"] for o, g in seen["groups"].items()}
        assert owners["parameters (sharded)"] == 4 * sum(numel.values())  # every fp32 shard (one rank: all of it)
        assert owners["parameters (gathered)"] == 2 * sum(v for n, v in numel.items() if not in_block(n, 1))
        assert owners["gradients"] == owners["optimizer state"] == 0
        assert "model.layers.0.mlp.up_proj.weight (gathered)" in seen["names"]
        assert "model.layers.1.mlp.up_proj.weight (local shard)" in seen["names"]
        assert "model.layers.1.mlp.up_proj.weight (gathered)" not in seen["names"]
        ranges = snapshot.owner_ranges(model, None)  # resharded after backward: no gathered copy, fp32 grad shards
        assert not [r for r in ranges if r[2] == "parameters (gathered)"]
        assert sum(e - s for s, e, o, _ in ranges if o == "gradients") == 4 * sum(numel.values())
    finally:
        distributed.shutdown(info)
