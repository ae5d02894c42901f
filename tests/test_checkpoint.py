"""Checkpoints: exact resume, resharding (2 -> 1 and 4 ranks), export, restart after SIGKILL, bad input.

Launches (shared between tests): one 2-rank torchrun runs the uninterrupted run
and an exact resume; one 2-rank elastic torchrun loses a worker to SIGKILL in
the middle of a save and must restart and finish by itself; one 4-rank torchrun resumes the 2-rank
checkpoint. Everything else runs in the pytest process (a one-rank group).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fsdptrain.core.errors import UserError
from tests.helpers import env, free_port, read_metrics, torchrun

STEPS = 8
ARCH = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "tie_word_embeddings": True}


def config(out: Path, **sections) -> dict:
    cfg = {
        "output_dir": str(out), "seed": 5,
        "model": {"hf_config": dict(ARCH)},
        "data": {"synthetic_task": "add", "synthetic_examples": 64, "max_length": 48},
        "train": {"max_steps": STEPS, "micro_batch_size": 2, "lr": 5e-3, "warmup_steps": 2, "schedule": "cosine",
                  "weight_decay": 0.1, "max_grad_norm": 0.5},
        "parallel": {"device": "cpu", "precision": "fp32"},
        "checkpoint": {"save_every": 2, "keep_last": 0},
        "logging": {"log_every": 1, "tensorboard": False, "progress": "lines"},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


def write(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir)}


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def two_rank(root):
    """The uninterrupted 2-rank run (async checkpoint every 2 steps, export at the end) and an exact resume of it."""
    full, resumed = root / "full", root / "resumed"
    spec = {"cases": [
        # written asynchronously: every test that resumes from or exports these checkpoints checks them
        {"name": "full", "config": write(root / "full.yaml", config(full, checkpoint={"export_hf": True,
                                                                                   "async_save": True}))},
        {"name": "resumed", "config": write(root / "resumed.yaml", config(
            resumed, checkpoint={"resume": str(ckpt(full, 4))}))},
    ]}
    (root / "spec2.json").write_text(json.dumps(spec))
    proc = torchrun(2, ["-m", "tests.workers.dist_cases", str(root / "spec2.json")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return full, resumed, proc.stdout


def test_resume_reproduces_uninterrupted_losses_bitwise(two_rank):
    full, resumed, stdout = two_rank
    a, b = losses(full), losses(resumed)
    assert sorted(a) == list(range(1, STEPS + 1))
    assert sorted(b) == list(range(5, STEPS + 1))  # only the steps after the checkpoint ran
    for s in b:
        assert b[s] == a[s], (s, a[s], b[s])
    assert a[STEPS] < a[1]
    state = json.loads((ckpt(full, 4) / "train_state.json").read_text())
    assert state["step"] == 4 and state["world_size"] == 2
    assert state["tokens_seen"] == sum(m["tokens"] for m in read_metrics(full)[:4])
    assert state["sampler"]["global_batch"] == 4
    assert sorted(os.listdir(ckpt(full, 4) / "rng")) == ["rank-00000.json", "rank-00001.json"]
    assert f"resumed from {ckpt(full, 4)} at step 4" in stdout
    assert "step 4 copied to CPU memory in" in stdout  # the full run saved in the background


def test_resume_on_one_rank_reshards(two_rank, tmp_path, capsys):
    from fsdptrain.config.schema import load_config
    from fsdptrain.trainer import train

    full = two_rank[0]
    cfg = config(tmp_path / "one", train={"micro_batch_size": 4}, checkpoint={"resume": str(ckpt(full, 4))})
    result = train(load_config(write(tmp_path / "c.yaml", cfg)))
    ref = losses(full)
    assert len(result.losses) == STEPS - 4
    assert max(abs(x - ref[5 + i]) for i, x in enumerate(result.losses)) < 1e-5, (result.losses, ref)
    # started again with resume: auto, the finished run says so and trains nothing
    cfg["checkpoint"]["resume"] = "auto"
    capsys.readouterr()
    again = train(load_config(write(tmp_path / "c.yaml", cfg)))
    assert again.losses == []
    out = capsys.readouterr().out
    assert f"resumed from {ckpt(tmp_path / 'one', STEPS)} at step {STEPS}" in out
    assert f"the run is already complete ({STEPS} of {STEPS} steps); nothing to train" in out


@pytest.mark.slow
def test_resume_on_four_ranks_reshards(two_rank, root):
    full = two_rank[0]
    cfg = config(root / "four", train={"micro_batch_size": 1}, checkpoint={"resume": str(ckpt(full, 4))})
    (root / "spec4.json").write_text(
        json.dumps({"cases": [{"name": "four", "config": write(root / "four.yaml", cfg)}]}))
    proc = torchrun(4, ["-m", "tests.workers.dist_cases", str(root / "spec4.json")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    got, ref = losses(root / "four"), losses(full)
    assert sorted(got) == list(range(5, STEPS + 1))
    assert max(abs(got[s] - ref[s]) for s in got) < 1e-5, (got, ref)
    assert "re-seeded" in proc.stdout  # 4 ranks cannot take the 2 saved RNG streams one to one


def test_export_cli_matches_trained_model_and_ties_weights(two_rank, tmp_path):
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from fsdptrain.cli import main

    full = two_rank[0]
    out = tmp_path / "hf"
    res = CliRunner().invoke(main, ["export", str(full), "--out", str(out), "--max-shard-size", "40KB"])
    assert res.exit_code == 0, res.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert "lm_head.weight" not in index["weight_map"]  # tied: stored once
    for f in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (out / f).is_file(), f
    exported = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    live = AutoModelForCausalLM.from_pretrained(str(full / "hf"), dtype=torch.float32)  # written by the trainer
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[5, 17, 40, 3, 9, 60, 22]])
    with torch.no_grad():
        a, b = exported(input_ids=ids).logits, live(input_ids=ids).logits
    assert torch.equal(a, b)
    sd_live = live.state_dict()
    assert all(torch.equal(t, sd_live[k]) for k, t in exported.state_dict().items())


@pytest.mark.slow
def test_restart_after_sigkill_during_a_save(two_rank, root):
    """Rank 1 is SIGKILLed while writing the step-6 checkpoint (steps 5 and 6 done, step 4 saved). torchrun
    restarts the group; it must delete the half-written step 6, resume from step 4 and finish as if
    nothing happened."""
    full = two_rank[0]
    run = root / "elastic"
    cfg = write(root / "elastic.yaml", config(run, checkpoint={"keep_last": 2}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--monitor-interval", "0.1",
           "-m", "tests.workers.fault_worker", "train", cfg]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=env(FSDPTRAIN_TEST_FAULTS="0:save:6:1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "killing rank 1 while saving step 6" in out
    assert "removed incomplete checkpoint folder(s) left by a crash: step-00000006.tmp" in out
    assert out.count(f"resumed from {ckpt(run, 4)} at step 4") == 1
    records = read_metrics(run)
    assert [m["step"] for m in records] == list(range(1, STEPS + 1))  # re-run steps replaced, not duplicated
    ref = losses(full)
    assert all(m["loss"] == ref[m["step"]] for m in records), (records, ref)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000006", "step-00000008"]

# ----------------------------------------------------------------------------- bad input (one rank, in process)


def _resume_error(tmp_path: Path, checkpoint: Path, **sections) -> str:
    from fsdptrain.config.schema import load_config
    from fsdptrain.trainer import train

    cfg = config(tmp_path / "bad", train={"micro_batch_size": 4}, checkpoint={"resume": str(checkpoint)})
    for k, v in sections.items():
        cfg[k].update(v)
    with pytest.raises(UserError) as e:
        train(load_config(write(tmp_path / "bad.yaml", cfg)))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_checkpoint_of_another_model_is_refused(two_rank, tmp_path):
    msg = _resume_error(tmp_path, ckpt(two_rank[0], 4), model={"hf_config": {**ARCH, "hidden_size": 48}})
    assert msg.startswith(f"{ckpt(two_rank[0], 4) / '.metadata'}: weight 'model.embed_tokens.weight' "
                          "has shape [100, 32] in the checkpoint, this model's is [100, 48]"), msg


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_shard_is_named(two_rank, tmp_path, damage):
    broken = tmp_path / "step-00000004"
    shutil.copytree(ckpt(two_rank[0], 4), broken)
    shard = broken / "__1_0.distcp"
    size = shard.stat().st_size
    if damage == "truncate":
        with open(shard, "r+b") as f:
            f.truncate(size // 2)
        want = f"{shard}: truncated or altered ({size // 2} bytes, COMPLETE.json records {size})"
    else:
        shard.unlink()
        want = f"{shard}: missing from the checkpoint"
    msg = _resume_error(tmp_path, broken)
    assert msg.startswith(want), msg


def test_auto_resume_sets_a_damaged_newest_checkpoint_aside_and_loads_the_one_before(two_rank, tmp_path, capsys):
    """resume: auto after a fault that damaged the newest checkpoint: it is renamed step-N.damaged (nothing
    deleted) and the run continues from the newest sound one, as exactly as from that one by name."""
    from fsdptrain.config.schema import load_config
    from fsdptrain.trainer import train

    full = two_rank[0]
    run = tmp_path / "run"
    for step in (2, 4, 6):
        shutil.copytree(ckpt(full, step), ckpt(run, step))
    shard = ckpt(run, 6) / "__1_0.distcp"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 1)
    cfg = config(run, train={"micro_batch_size": 4}, checkpoint={"resume": "auto"})
    capsys.readouterr()
    result = train(load_config(write(tmp_path / "c.yaml", cfg)))
    out = capsys.readouterr().out
    assert (f"checkpoint: step-00000006 is damaged ({shard}: truncated or altered ({size - 1} bytes, COMPLETE.json "
            f"records {size})); moved it to step-00000006.damaged and resuming from step-00000004, the newest "
            "complete checkpoint before it") in out
    assert f"resumed from {ckpt(run, 4)} at step 4" in out
    ref = losses(full)
    assert len(result.losses) == STEPS - 4
    assert max(abs(x - ref[5 + i]) for i, x in enumerate(result.losses)) < 1e-5, (result.losses, ref)
    damaged = run / "checkpoints" / "step-00000006.damaged"
    assert damaged.is_dir() and (damaged / "__1_0.distcp").stat().st_size == size - 1  # kept as it was
    # named, damaged: no fallback, one line
    broken = tmp_path / "named" / "step-00000006"
    shutil.copytree(damaged, broken)
    msg = _resume_error(tmp_path, broken)
    assert msg.startswith(f"{broken / '__1_0.distcp'}: truncated or altered"), msg


def test_world_size_the_sampler_cannot_map(two_rank, tmp_path):
    msg = _resume_error(tmp_path, ckpt(two_rank[0], 4), train={"micro_batch_size": 2})
    path = ckpt(two_rank[0], 4) / "train_state.json"
    assert msg == (f"{path}: the sampler state (global batch 4 = 2 ranks x micro 2 x accum 1) cannot map onto 1 ranks "
                   "x micro 2 x accum 1 = 2; choose train.micro_batch_size and train.grad_accum_steps so that "
                   "ranks x micro x accum = 4 (checkpoint.resume=none starts fresh)"), msg


def test_incomplete_checkpoint_path_and_export_errors(two_rank, tmp_path):
    from click.testing import CliRunner

    from fsdptrain.cli import main

    partial = tmp_path / "step-00000004.tmp"
    shutil.copytree(ckpt(two_rank[0], 4), partial)
    (partial / "COMPLETE.json").unlink()
    msg = _resume_error(tmp_path, partial)
    assert msg.startswith(f"checkpoint.resume: {partial}: incomplete checkpoint (no COMPLETE.json"), msg
    broken = tmp_path / "step-00000002"
    shutil.copytree(ckpt(two_rank[0], 2), broken)
    (broken / "__0_0.distcp").unlink()
    res = CliRunner().invoke(main, ["export", str(broken), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [f"fsdptrain: error: {broken / '__0_0.distcp'}: missing from the "
                                               "checkpoint (listed in COMPLETE.json); the checkpoint is damaged, "
                                               "resume from another one"]
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- folder bookkeeping (no processes)


def test_auto_resume_picks_newest_complete_and_cleans_only_own_leftovers(tmp_path):
    from fsdptrain.run import checkpoint as ck

    root = tmp_path / "checkpoints"
    for name, marker in [("step-00000002", True), ("step-00000010", True), ("step-00000012", False),
                         ("step-00000014.tmp", False), ("step-00000004.deleting", False)]:
        (root / name).mkdir(parents=True)
        (root / name / "x").write_text("1")
        if marker:
            (root / name / "COMPLETE.json").write_text(json.dumps({"files": {"x": 1}}))
    assert ck.resolve_resume("auto", tmp_path) == root / "step-00000010"
    # only the trainer's own leftovers go; the unmarked step-00000012 may be the user's (marker removed by hand)
    assert ck.clean_incomplete(root) == (["step-00000004.deleting", "step-00000014.tmp"], ["step-00000012"])
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000010", "step-00000012"]
    assert ck.resolve_resume("none", tmp_path) is None
    assert ck.resolve_resume(str(tmp_path), tmp_path) == root / "step-00000010"  # a run directory
    with pytest.raises(UserError, match="no such folder"):
        ck.resolve_resume(str(tmp_path / "nope"), tmp_path)


def test_trim_metrics_drops_steps_that_will_rerun(tmp_path):
    from fsdptrain.run.rundir import trim_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo')
    trim_metrics(path, 4)
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_async_save_on_cuda_resumes_exactly(tmp_path):
    from fsdptrain.config.schema import load_config
    from fsdptrain.trainer import train

    cuda = {"device": "cuda", "precision": "fp32"}
    full = train(load_config(write(tmp_path / "a.yaml", config(tmp_path / "a", parallel=cuda,
                                                               checkpoint={"async_save": True}))))
    assert (ckpt(tmp_path / "a", 4) / "COMPLETE.json").is_file()
    resumed = train(load_config(write(tmp_path / "b.yaml", config(
        tmp_path / "b", parallel=cuda, checkpoint={"resume": str(ckpt(tmp_path / "a", 4))}))))
    assert max(abs(x - y) for x, y in zip(resumed.losses, full.losses[4:])) < 1e-6


def test_safetensors_rows_read_without_mmap(tmp_path):
    from safetensors.torch import save_file

    from fsdptrain.model.safetensors_io import SafetensorsFile

    w = torch.randn(7, 5)
    save_file({"w": w.to(torch.bfloat16), "v": torch.arange(6.0)}, str(tmp_path / "a.safetensors"))
    f = SafetensorsFile(tmp_path / "a.safetensors")
    out = torch.empty(3, 5)  # rows 4..6, bf16 in the file -> fp32 here
    f.read_into("w", (slice(4, 7), slice(0, 5)), out)
    assert torch.equal(out, w.to(torch.bfloat16)[4:7].float())
    cols = torch.empty(7, 2)  # not one contiguous range: falls back to safetensors' get_slice
    f.read_into("w", (slice(0, 7), slice(1, 3)), cols)
    assert torch.equal(cols, w.to(torch.bfloat16)[:, 1:3].float())
    v = torch.empty(2)
    f.read_into("v", (slice(4, 6),), v)
    assert v.tolist() == [4.0, 5.0]
    f.close()
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "b.safetensors").write_bytes(data[:-20])
    g = SafetensorsFile(tmp_path / "b.safetensors")
    with pytest.raises(UserError, match=r"b.safetensors: truncated: tensor '(v|w)' ends past the end of the file"):
        for key in ("v", "w"):
            g.read_into(key, (slice(0, g.shape(key)[0]),) + tuple(slice(0, n) for n in g.shape(key)[1:]),
                        torch.empty(g.shape(key)))
    g.close()


# ----------------------------------------------------------------------------- a write that fails


def _failed_write_line(run: Path, step: int, reason: str) -> str:
    """The one line of a failed save, the free space left as a pattern (it is measured at that moment)."""
    import re

    return (re.escape(f"fsdptrain: error: checkpoint: could not write step {step} into {run / 'checkpoints'} "
                      f"({reason}; ") + r"\d+(\.\d\d \wiB| B)" + re.escape(
        " free there); the earlier checkpoints there are intact: free space (or fix the folder) and rerun the same "
        "command to continue from the newest one") + "\n")


def test_torch_writer_failing_inside_dcp_is_one_line_and_keeps_the_earlier_checkpoints(tmp_path, monkeypatch):
    """On a full disk torch.save's zip writer, inside DCP's FileSystemWriter, raises a RuntimeError of its own
    (not OSError(ENOSPC)); DCP hands it to every rank in a CheckpointException, which is not even an Exception."""
    import re

    from torch.distributed.checkpoint import FileSystemWriter

    from tests.helpers import cli_inproc

    write_data = FileSystemWriter.write_data
    calls = []

    def full_at_the_second_save(self, plan, planner):
        calls.append(self.path)
        if len(calls) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return write_data(self, plan, planner)

    monkeypatch.setattr(FileSystemWriter, "write_data", full_at_the_second_save)
    run = tmp_path / "run"
    cfg = write(tmp_path / "c.yaml", config(run, train={"max_steps": 6}, logging={"progress": "none",
                                                                                   "tensorboard": False}))
    proc = cli_inproc(["train", cfg])
    assert proc.returncode == 2, proc.stderr
    assert re.fullmatch(_failed_write_line(run, 4, "the file writer stopped short: unexpected pos 704 vs 598"),
                        proc.stderr), proc.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002"]  # the .tmp is gone
    assert (ckpt(run, 2) / "COMPLETE.json").is_file()

    calls.clear()  # a failure that is no write (a bug) is an internal error with its traceback in a file, not a
    monkeypatch.setattr(FileSystemWriter, "write_data", lambda self, plan, planner: 1 / 0)  # bare CheckpointException
    proc = cli_inproc(["train", cfg, "checkpoint.resume=none", f"output_dir={tmp_path / 'bug'}"])
    lines = proc.stderr.splitlines()
    assert (proc.returncode, len(lines)) == (1, 2), proc.stderr
    assert lines[0] == "fsdptrain: internal error: RuntimeError: checkpoint step 2: ZeroDivisionError: division by zero"


def test_a_write_failure_on_any_rank_is_named_on_every_rank():
    """What each rank raises after DCP's gather: the failures of all ranks. A failed write anywhere is a write
    failure everywhere; a lost peer alone is not (the peer-loss handling names the dead rank)."""
    from torch.distributed.checkpoint.api import CheckpointException

    from fsdptrain.run.checkpoint import write_failure

    zip_error = RuntimeError("[enforce fail at inline_container.cc:652] . PytorchStreamWriter failed writing file "
                             "data/3: file write failed")
    peer = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    assert write_failure(CheckpointException("write", {1: (zip_error, None)})) == "file write failed"
    assert write_failure(CheckpointException("write", {0: (peer, None), 1: (OSError(28, "No space left on device"),
                                                                            None)})) == "No space left on device"
    assert write_failure(CheckpointException("write", {
        1: (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"), None)})) == \
        "the file writer stopped short: unexpected pos 704 vs 598"
    assert write_failure(CheckpointException("write", {1: (peer, None)})) is None
    assert write_failure(ConnectionResetError(104, "Connection reset by peer")) is None
    assert write_failure(CheckpointException("write", {0: (TypeError("a bug"), None)})) is None


def _mount_tmpfs(path: Path, size: int) -> None:
    path.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a tmpfs here ({e}); needs root")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_tmpfs_is_one_line_and_keeps_the_earlier_checkpoints(tmp_path):
    """The real thing: output_dir on a file system with room for one checkpoint, a save every 2 steps."""
    import re

    from tests.helpers import cli_inproc

    sized = tmp_path / "sized"  # one checkpoint's bytes, as this model and optimizer write them
    assert cli_inproc(["train", write(tmp_path / "s.yaml", config(sized, train={"max_steps": 2}, logging={
        "progress": "none", "tensorboard": False}))]).returncode == 0
    one = sum(f.stat().st_size + 4096 for f in (sized / "checkpoints").rglob("*") if f.is_file())
    fs = tmp_path / "fs"
    _mount_tmpfs(fs, int(1.6 * one) // 4096 * 4096)
    try:
        run = fs / "run"
        proc = cli_inproc(["train", write(tmp_path / "c.yaml", config(run, train={"max_steps": 6}, logging={
            "progress": "none", "tensorboard": False}))])
        assert proc.returncode == 2, proc.stderr
        reasons = "(No space left on device|the file writer stopped short: [^;]*|file write failed)"
        pattern = _failed_write_line(run, 4, "REASON").replace(re.escape("REASON"), reasons)
        assert re.fullmatch(pattern, proc.stderr), proc.stderr
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002"]
        assert (ckpt(run, 2) / "COMPLETE.json").is_file()
    finally:
        subprocess.run(["umount", str(fs)], capture_output=True, timeout=30)
