"""Mixed GPUs: data.balance (a step's global batch split between ranks by shares of its tokens: weights, or
measured speed), the time report, and activation_checkpointing auto planned per rank."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
import yaml

from fsdptrain.data.loader import StepSampler, even_cuts, split_by_shares
from tests.helpers import read_metrics, run_cli, torchrun


def test_split_follows_the_shares_and_keeps_one_item_per_micro_batch():
    assert split_by_shares([10] * 16, [2, 1], 2) == [(0, 11), (11, 16)]  # 110 of 160 tokens: closest to 2/3
    assert split_by_shares([10] * 16, [1, 1], 2) == [(0, 8), (8, 16)]
    assert split_by_shares([10] * 16, [100, 1], 2) == [(0, 14), (14, 16)]  # rank 1 still has its 2 micro-steps
    assert split_by_shares([10] * 16, [1, 100], 4) == [(0, 4), (4, 16)]
    # by tokens, not by count: two long items weigh as much as the six short ones
    assert split_by_shares([30, 30, 10, 10, 10, 10, 10, 10], [1, 1], 1) == [(0, 2), (2, 8)]
    assert split_by_shares([5] * 12, [1, 2, 1], 1) == [(0, 3), (3, 9), (9, 12)]
    assert even_cuts(0, 7, 3) == [(0, 3), (3, 5), (5, 7)]


def test_the_global_batch_is_the_by_count_one_whatever_the_shares():
    lengths = [(7 * i) % 23 + 3 for i in range(96)]
    by_count = [StepSampler(96, 2, r, 4, 3, seed=1, lengths=lengths) for r in range(2)]
    for shares in ([0.5, 0.5], [0.8, 0.2], [0.05, 0.95]):
        weighted = [StepSampler(96, 2, r, 4, 3, seed=1, lengths=lengths, shares=shares) for r in range(2)]
        for step in range(10):  # several epochs (4 steps each)
            mbs = [s.rank_micro_batches(step) for s in weighted]
            assert all(len(m) == 3 and min(map(len, m)) >= 1 for m in mbs)  # every rank: 3 micro-steps
            flat = [i for m in mbs for mb in m for i in mb]
            assert flat == by_count[0].global_indices(step)  # the same examples, in the same order
            want = split_by_shares([lengths[i] for i in flat], shares, 3)
            assert [sum(map(len, m)) for m in mbs] == [b - a for a, b in want]
    assert list(map(len, weighted[0].rank_micro_batches(0))) == [1, 1, 1]  # 5% of the tokens: one per micro-step


def _config(path: Path, out: Path, **data) -> str:
    cfg = {"output_dir": str(out), "seed": 3,
           "model": {"hf_config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                   "max_position_embeddings": 128}},
           "data": {"synthetic_task": "add", "synthetic_examples": 96, "max_length": 48, **data},
           "train": {"max_steps": 6, "micro_batch_size": 4, "grad_accum_steps": 2, "lr": 3e-3},
           "parallel": {"device": "cpu", "precision": "fp32"},
           "logging": {"log_every": 1, "tensorboard": False, "progress": "lines"}}
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.slow
def test_weighted_and_speed_balanced_runs_train_like_the_unbalanced_run(tmp_path):
    """2 ranks: by count, by weights [3, 1], and by measured speed with rank 1 made twice as slow per token (sleeps
    inside its blocks: as fast as rank 0 in the forward, three times as slow in the backward, so a clock that
    timed only the forwards would see equal speeds). The losses match the by-count run; the speed shares converge
    to 2:1."""
    cases = {"none": {}, "weights": {"balance": [3, 1]}, "speed": {"balance": "speed", "balance_every": 2},
             "slow": {}, "plans": {}}
    spec = {"cases": [{"config": _config(tmp_path / f"{k}.yaml", tmp_path / k, **v),
                       "slow": {"forward": [1e-4, 1e-4], "backward": [1e-4, 3e-4]} if k in ("speed", "slow")
                       else None}
                      for k, v in cases.items()]}
    # activation_checkpointing auto with a budget per rank: rank 0 plans no recomputation, rank 1 full blocks
    plans = yaml.safe_load(Path(spec["cases"][-1]["config"]).read_text())
    plans["parallel"].update(activation_checkpointing="auto", memory_budget_gib=[100, 0.0001])
    Path(spec["cases"][-1]["config"]).write_text(yaml.safe_dump(plans))
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = torchrun(2, ["-m", "tests.workers.balance_cases", str(tmp_path / "spec.json")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    ref = [m["loss"] for m in read_metrics(tmp_path / "none")]
    assert len(ref) == 6
    for k in ("weights", "speed", "plans"):
        got = [m["loss"] for m in read_metrics(tmp_path / k)]
        assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-6, (k, got, ref)
    # the two ranks recompute different blocks (FSDP2 gathers in the pre-backward hook either way: no hang)
    assert re.search(r"activation checkpointing auto, planned per rank: rank 0: blocks 0-1 none; estimated peak "
                     r"[\d.]+ \w+ for a budget of 100\.00 GiB \(fits\); rank 1: blocks 0-1 full; estimated peak "
                     r"[\d.]+ \w+ for a budget of 104\.86 KiB \(does NOT fit even with every block full; see "
                     r"`fsdptrain estimate`\)", proc.stdout), proc.stdout[-3000:]
    assert "data: balance: each step's tokens split between the ranks by the shares [0.750, 0.250]" in proc.stdout
    updates = re.findall(r"balance: step (\d+): compute speed per rank \[\d+, \d+\] tokens/s; shares of each "
                         r"step's tokens now \[([\d.]+), ([\d.]+)\]", proc.stdout)
    assert [int(s) for s, _, _ in updates] == [3, 5]  # after step 3, then every 2 steps
    for _, a, b in updates:
        assert abs(float(a) - 2 / 3) < 0.07 and abs(float(a) + float(b) - 1) < 2e-3, updates

    # unbalanced with the slow rank: the end of the run names it and what balancing would do
    slow = proc.stdout[proc.stdout.index(f"outputs in {tmp_path / 'speed'}"):]
    m = re.search(r"time: compute per token \(blocks, forward and backward\) by rank \[[\d.]+, [\d.]+\] us; "
                  r"rank 1 computed "
                  r"([\d.]+)x as long per step as the fastest, and the other ranks waited about ([\d.]+) s per step "
                  r"for it; data.balance: speed would split each step's tokens by the ranks' speeds \(the compute of "
                  r"a step about ([\d.]+)x of now\)", slow)
    assert m and 1.6 < float(m[1]) < 2.4 and 0.6 < float(m[3]) < 0.8, slow[:3000]
    # and `fsdptrain mem report` says it again from memory/compute.json
    from click.testing import CliRunner

    from fsdptrain.cli import main

    rep = CliRunner().invoke(main, ["mem", "report", str(tmp_path / "slow")])
    assert rep.exit_code == 0 and f"\n{m[0]}\n" in rep.output, rep.output

    def taken(k: str) -> list[list[int]]:  # examples per step, rank 0 and rank 1
        return [json.loads((tmp_path / k / f"examples-rank{r}.json").read_text()) for r in range(2)]

    assert taken("none") == [[8] * 6, [8] * 6]
    w0, w1 = taken("weights")
    assert all(a + b == 16 and a > 2 * b for a, b in zip(w0, w1)), (w0, w1)  # 3/4 of the tokens on rank 0
    s0, s1 = taken("speed")
    assert all(a + b == 16 for a, b in zip(s0, s1)) and all(4 <= a <= 12 for a in s0[:3]), (s0, s1)
    assert all(a > 1.5 * b for a, b in zip(s0[3:], s1[3:])), (s0, s1)  # from step 4 on, 2/3 of the tokens


class _Event:
    """Stand-in for torch.cuda.Event: record() notes the wall clock, elapsed_time() is in milliseconds."""

    def __init__(self, enable_timing: bool = False):
        assert enable_timing
        self.at: float | None = None

    def record(self) -> None:
        self.at = time.perf_counter()

    def elapsed_time(self, end: _Event) -> float:
        return (end.at - self.at) * 1000.0


def test_the_clock_times_each_blocks_backward_between_fsdp2s_gather_and_reduce_scatter(monkeypatch):
    """3 fully_shard blocks on a one-rank gloo group, blocks 0 and 2 fully checkpointed. In the forward each
    block's interval opens after FSDP2's pre-forward (the all-gather wait) and closes before its post-forward; in
    the backward it opens after FSDP2's pre-backward (the all-gather wait) and closes before its post-backward
    (the reduce-scatter), with the checkpointed blocks' recomputation inside it and not timed a second time. The
    GPU path (CUDA events, a stand-in here) gives the CPU path's seconds."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    from fsdptrain.config.schema import load_config
    from fsdptrain.dist import distributed
    from fsdptrain.model import models
    from fsdptrain.objectives.loss import token_loss_sum
    from fsdptrain.train.balance import ComputeClock
    from fsdptrain.train.build import build_sharded_model

    events: list[tuple] = []
    cfg = load_config(None, ["parallel.device=cpu", "parallel.precision=fp32",
                             "parallel.activation_checkpointing=every_k", "parallel.activation_checkpointing_k=2"])
    cfg.model.hf_config = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 97,
                           "max_position_embeddings": 64}
    info = distributed.init("cpu")
    try:
        sharded = build_sharded_model(cfg, info, models.load_hf_config(None, cfg.model.hf_config, None, False))
        blocks = sharded.blocks
        name = {id(b): i for i, b in enumerate(blocks)}

        def spy(hook: str):
            real = getattr(FSDPParamGroup, hook)

            def wrapped(self, *a, **k):
                events.append((hook, name.get(id(self.modules[0]), "root")))
                return real(self, *a, **k)
            monkeypatch.setattr(FSDPParamGroup, hook, wrapped)

        for hook in ("pre_forward", "post_forward", "pre_backward", "post_backward"):
            spy(hook)
        for i, b in enumerate(blocks):  # the block's own compute (its MLP), forward or recomputed in backward
            b.mlp.register_forward_pre_hook(lambda m, a, i=i: events.append(
                ("recompute" if torch._C._current_graph_task_id() != -1 else "compute", i)))
        cpu = ComputeClock(blocks, torch.device("cpu"))
        real_mark, real_close = ComputeClock._mark, ComputeClock._close
        monkeypatch.setattr(ComputeClock, "_mark", lambda self: (events.append(("open", self.cuda)),
                                                                 real_mark(self))[1])
        monkeypatch.setattr(ComputeClock, "_close", lambda self, s: (real_close(self, s),
                                                                     events.append(("close", self.cuda)))[0])
        g = torch.Generator().manual_seed(1)
        batch = {"input_ids": torch.randint(0, 97, (2, 24), generator=g),
                 "labels": torch.randint(0, 97, (2, 24), generator=g)}
        token_loss_sum(sharded.model, batch).backward()
        seq = [e for e in events if e[1] is not True and e[1] != "root"]  # the CPU clock and the blocks
        fwd = [[("pre_forward", i), ("open", False), ("compute", i), ("post_forward", i), ("close", False)]
               for i in range(3)]
        bwd = [[("pre_backward", i), ("open", False)] + ([("recompute", i)] if i != 1 else [])
               + [("close", False), ("post_backward", i)] for i in (2, 1, 0)]
        assert seq == sum(fwd + bwd, []), "\n".join(map(str, seq))
        assert cpu.take() > 0 and cpu.take() == 0.0

        # the GPU path: the same intervals from (stand-in) CUDA events, read at take(). Both clocks time this
        # pass; their hooks sit at slightly different places (each interval holds some of the other clock's hook
        # work), so a 10 ms stand-in compute in every block's forward and recomputation makes the intervals'
        # contents, not the hooks, what is compared (a tiny block alone: 8% apart once on a loaded machine)
        for b in blocks:
            b.mlp.register_forward_pre_hook(lambda m, a: time.sleep(0.01))
        monkeypatch.setattr(torch.cuda, "Event", _Event)
        gpu = ComputeClock(blocks, torch.device("cuda"))
        token_loss_sum(sharded.model, batch).backward()
        assert len(gpu._events) == 6  # forward and backward of 3 blocks
        a, b = cpu.take(), gpu.take()
        assert abs(a - b) < 0.05 * a, (a, b)
        assert not gpu._events and gpu.take() == 0.0
        cpu.close(), gpu.close()
    finally:
        distributed.shutdown(info)


def test_auto_checkpointing_plans_each_rank_for_its_weighted_share():
    """data.balance [3, 1]: rank 0's micro-batches hold about 3/4 of the step's 2 x 4 examples, rank 1's 1/4, so
    auto plans rank 0 for 6 examples (more recomputation than for the nominal 4) and rank 1 for 2 (less). Under
    speed the shares are not known yet: the plan is for the nominal size, with a line saying how far it can grow."""
    import dataclasses

    from fsdptrain.config.schema import Config
    from fsdptrain.memory import estimate
    from fsdptrain.model import models

    hf = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 97, "max_position_embeddings": 512}
    model = models.build_meta_model(models.load_hf_config(None, hf, None, False), "sdpa", torch.float32, False)
    cfg = Config()
    cfg.train.micro_batch_size, cfg.data.max_length, cfg.parallel.precision = 4, 512, "fp32"
    cfg.parallel.activation_checkpointing = "auto"
    s = estimate.settings_from_config(cfg, 1, 2, 2**30, device_type="cpu")
    shape = estimate.shape_of_model(model)
    nominal = estimate.compute(shape, s.with_plan(["none"] * 4)).peak
    cfg.parallel.memory_budget_gib = nominal / 2**30  # the nominal micro-batch fits without recomputation
    assert estimate.plan_auto_checkpointing(cfg, model, 2, 2, torch.device("cpu"), 0)[0] == ["none"] * 4

    weighted = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, balance=[3, 1]))
    assert [estimate.weighted_micro_batch(weighted, r, 2, 2) for r in range(2)] == [6, 2]
    assert [estimate.weighted_micro_batch(weighted, r, 4, 2) for r in range(4)] == [6, 6, 2, 2]  # one per node
    plans = [estimate.plan_auto_checkpointing(weighted, model, 2, 2, torch.device("cpu"), r)[0] for r in range(2)]
    assert plans[0] != ["none"] * 4 and plans[1] == ["none"] * 4, plans
    bigger = estimate.settings_from_config(weighted, 1, 2, 2**30, device_type="cpu").vary(train={"micro_batch_size": 6})
    assert plans[0] == estimate.plan_checkpointing(shape, bigger, int(nominal))[0]

    speed = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, balance="speed"))
    assert estimate.weighted_micro_batch(speed, 0, 2, 2) is None and estimate.speed_balance_note(cfg, 2) is None
    assert estimate.speed_balance_note(speed, 2) == (
        "activation checkpointing auto: planned for train.micro_batch_size 4, but under data.balance: speed a fast "
        "rank's micro-batches grow with its measured share, up to 7 examples; leave the fast GPUs headroom "
        "(parallel.memory_budget_gib per rank) or give the ranks fixed weights (data.balance: [..], planned for "
        "each rank's share)")


@pytest.mark.parametrize("data, line", [
    ({"balance": [2, 0]}, "data.balance: weights must be numbers above zero, got [0] in [2, 0]; give every rank a "
                          "positive weight (e.g. [2, 1] for a rank twice as fast as the other)"),
    ({"balance": "fast"}, "data.balance: expected none, speed or a list of per-rank weights (e.g. [2, 1]), got "
                          "'fast'"),
    ({"balance": "speed", "micro_batch_sizes": [4, 2]},
     "data.balance and data.micro_batch_sizes exclude each other: both decide how much of a step each rank takes; "
     "choose one (data.balance=none, or remove data.micro_batch_sizes)"),
    ({"balance": "speed", "compile": True},
     "data.balance: speed times each rank's blocks with forward hooks, which parallel.compile would trace into the "
     "compiled blocks; give the ranks' weights instead (e.g. data.balance=[2,1]) or set parallel.compile=false"),
    ({"budget": [10, 20, 30]}, "parallel.memory_budget_gib: 3 entries, but the job has 1 ranks on 1 node(s); "
                               "give one budget, one per node or one per rank"),
    ({"budget": [10, -1]}, "parallel.memory_budget_gib: expected GiB as a number >= 0 or a list of them (one per "
                           "node or per rank), got [10, -1]; e.g. 70 or [22, 76]"),
    ({"balance": [1, 2, 3]}, "data.balance: 3 entries, but the job has 1 ranks on 1 node(s); give one weight per "
                             "rank or one per node"),
])
def test_bad_balance_settings_are_one_line(tmp_path, data, line):
    data = dict(data)
    parallel = {"compile": data.pop("compile")} if "compile" in data else {}
    if "budget" in data:
        parallel = {"activation_checkpointing": "auto", "memory_budget_gib": data.pop("budget")}
    cfg = _config(tmp_path / "c.yaml", tmp_path / "run", **data)
    text = yaml.safe_load(Path(cfg).read_text())
    text["parallel"].update(parallel)
    Path(cfg).write_text(yaml.safe_dump(text))
    proc = run_cli(["train", cfg], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fsdptrain: error: ") and err[0].endswith(line), err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_time_report_names_the_rank_the_others_waited_for():
    from fsdptrain.train.balance import time_report

    # [compute seconds, tokens, steps]: rank 1 twice as slow per token on equal tokens
    line = time_report([[1.0, 1000.0, 10], [2.0, 1000.0, 10], [1.0, 1000.0, 10]], balancing=False)
    assert line == ("time: compute per token (blocks, forward and backward) by rank [1000.0, 2000.0, 1000.0] us; "
                    "rank 1 computed "
                    "2.00x as long per step as the fastest, and the other ranks waited about 0.100 s per step for it; "
                    "data.balance: speed would split each step's tokens by the ranks' speeds (the compute of a step "
                    "about 0.60x of now)")  # 300 tokens / (1 + 0.5 + 1) tokens per ms = 120 ms instead of 200
    assert time_report([[1.0, 1000.0, 10], [1.05, 1000.0, 10]], balancing=False) is None  # within 10%
    assert time_report([[1.0, 1000.0, 0], [2.0, 1000.0, 0]], balancing=False) is None  # no step timed
    assert time_report([[1.0, 1000.0, 10], [2.0, 1000.0, 10]], balancing=True).endswith(
        "(data.balance: speed was on: its shares are in the balance lines above)")


def test_estimate_plans_each_gpu_size_and_the_speed_shares():
    """Llama-3.1-8B full fine-tuning on a node of 4 x 24 GB and 4 x 80 GB: each size gets its own auto plan, and
    relative speeds give the shares data.balance: speed would reach."""
    from click.testing import CliRunner

    from fsdptrain.cli import main
    from tests.helpers import REPO

    args = ["estimate", str(REPO / "configs" / "estimate-llama3.1-8b-1x8.yaml"),
            "parallel.activation_checkpointing=auto", "parallel.optimizer_offload=true", "--nnodes", "1",
            "--gpus-per-node", "8"]
    res = CliRunner().invoke(main, [*args, "--gpu-memory", "4x24GiB,4x80GiB", "--gpu-speed", "4x1,4x3"])
    assert res.exit_code == 0, res.output
    tail = res.output[res.output.index("per GPU size"):].splitlines()
    assert tail == [
        "per GPU size (each rank plans for its own memory):",
        "  ranks 0-3 (24.00 GiB): blocks 0-15 full, 16-31 selective; peak 20.67 GiB; fits",
        "  ranks 4-7 (80.00 GiB): blocks 0-31 none; peak 38.43 GiB; fits",
        "data.balance: speed for these speeds: shares of each step's tokens ranks 0-3 0.062 each; ranks 4-7 0.188 "
        "each; a step's compute about 0.50x of the unbalanced step (where every rank waits for the slowest)"]
    # the breakdown above is the smallest GPU's, as for one size
    one = CliRunner().invoke(main, [*args, "--gpu-memory", "24GiB"])
    assert res.output.startswith(one.output)
    bad = CliRunner().invoke(main, [*args, "--gpu-memory", "24GiB,80GiB,80GiB"])
    assert bad.exit_code == 2 and bad.output.strip() == (
        "fsdptrain: error: --gpu-memory: 3 values for 1 node(s) x 8 GPUs; give one value, one per node (1) or one "
        "per GPU (8), e.g. 4x24GiB,4x80GiB")
    bad = CliRunner().invoke(main, [*args, "--gpu-speed", "8x0"])
    assert bad.exit_code == 2
    assert bad.output.strip() == "fsdptrain: error: --gpu-speed: '8x0': every speed must be above zero"
