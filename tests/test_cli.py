"""The command line as a user meets it: exit codes and one-line errors, the demo run, non-finite stops."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import LLAMA, REPO, cli_inproc, make_model_dir, read_metrics, run_cli


def assert_one_line_error(proc, expected_start: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fsdptrain: error: " + expected_start), lines[0]
    assert "Traceback" not in proc.stderr


def test_unknown_key_exits_2_with_one_line(tmp_path):
    proc = cli_inproc(["train", "train.lerning_rate=1e-4", f"output_dir={tmp_path}"])
    assert_one_line_error(proc, "override 'train.lerning_rate=1e-4': unknown key 'train.lerning_rate'")


def test_wrong_type_in_file_exits_2_with_one_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  hf_config: {model_type: llama}\ntrain:\n  max_steps: ten\n")
    proc = cli_inproc(["train", str(cfg)])
    assert_one_line_error(proc, f"{cfg}: train.max_steps: expected an integer, got 'ten' (str)")


def test_cpu_offload_on_cpu_is_a_one_line_error_before_any_work(tmp_path):
    proc = cli_inproc(["train", "parallel.cpu_offload=true", f"output_dir={tmp_path / 'run'}"])
    assert_one_line_error(proc, "parallel.cpu_offload: true needs CUDA GPUs")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_auto_checkpointing_on_cpu_without_a_budget_is_a_one_line_error(tmp_path):
    proc = cli_inproc(["train", "parallel.activation_checkpointing=auto", f"output_dir={tmp_path / 'run'}"])
    assert_one_line_error(proc, "parallel.memory_budget_gib: activation_checkpointing=auto on CPU needs a budget; "
                                "set parallel.memory_budget_gib (GiB) or choose another activation_checkpointing")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_missing_model_folder_is_a_one_line_error(tmp_path):
    proc = cli_inproc(["train", f"model.path={tmp_path / 'nowhere'}", f"output_dir={tmp_path / 'run'}"])
    assert_one_line_error(proc, f"model.path: {tmp_path / 'nowhere'}: no config.json there")


def test_config_dump_prints_effective_values():
    proc = run_cli(["config", "--dump", "train.lr=0.25"])
    assert proc.returncode == 0, proc.stderr
    assert "lr: 0.25" in proc.stdout
    assert "# Peak learning rate." in proc.stdout


@pytest.mark.slow
def test_demo_run_learns(tmp_path):
    """The built-in demo, exactly as `fsdptrain train` runs it, apart from where it writes."""
    proc = run_cli(["train", f"output_dir={tmp_path}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(tmp_path)
    metrics = [m for m in records if "loss" in m]
    assert metrics[0]["step"] == 1 and metrics[-1]["step"] == 500
    first, last = metrics[0]["loss"], metrics[-1]["loss"]
    assert first > 4.0  # about ln(100): an untrained model over the 100-token vocabulary
    assert last < 0.4 * first, (first, last)
    evals = [m for m in records if "eval_loss" in m]  # data.val_size 0.05, train.eval_every 250
    assert [m["step"] for m in evals] == [250, 500] and evals[-1]["eval_loss"] < 0.4 * first, evals
    assert "eval step 500: loss" in proc.stderr + proc.stdout
    assert "done: 500 steps" in proc.stdout
    assert (tmp_path / "config.yaml").is_file()
    assert any((tmp_path / "tb").iterdir())


def test_nonfinite_weights_stop_the_run_naming_step_and_rank(tmp_path):
    model = make_model_dir(tmp_path / "m", LLAMA)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(model / "model.safetensors"))
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = math.inf
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    common = [f"model.path={model}", "train.max_steps=3", "data.synthetic_examples=64", "logging.progress=none"]
    proc = run_cli(["train", *common, f"output_dir={tmp_path / 'stop'}", "model.hf_config=null"])
    assert_one_line_error(proc, "non-finite loss on rank(s) [0] at step 1: loss=nan")

    proc = run_cli(["train", *common, f"output_dir={tmp_path / 'skip'}", "train.on_nonfinite=skip"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("non-finite loss on rank(s) [0]; update skipped") == 3
    assert torch.isinf(load_file(str(model / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"][0, 0])


def test_fresh_start_in_a_used_output_dir_moves_the_earlier_run_aside(tmp_path):
    from fsdptrain.config.schema import load_config
    from fsdptrain.trainer import train

    common = [f"output_dir={tmp_path}", "train.max_steps=2", "data.synthetic_examples=64", "logging.progress=none",
              "logging.log_every=1", "logging.tensorboard=false"]
    train(load_config(None, common))
    first = (tmp_path / "metrics.jsonl").read_text()
    train(load_config(None, [*common, "checkpoint.resume=none", "seed=5"]))
    prev = tmp_path / "previous-1"
    assert (prev / "metrics.jsonl").read_text() == first  # nothing of the first run is lost or mixed
    assert (prev / "checkpoints" / "step-00000002" / "COMPLETE.json").is_file()
    assert len(read_metrics(tmp_path)) == 2
    assert read_metrics(tmp_path)[0]["loss"] != read_metrics(prev)[0]["loss"]  # the new run (another seed)


def test_eval_takes_the_run_config_from_the_checkpoint_and_overrides_first(tmp_path):
    """`fsdptrain eval --checkpoint RUN` needs no CONFIG: the run's config.yaml is the default, also for a
    checkpoint in the run, and a first key=value overrides it. (The config is made to fail on purpose here, so
    the error names the file that was read; tests/test_eval.py evaluates a real run this way.)"""
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run / "config.yaml").write_text("train:\n  max_steps: -3\n")
    for source in (run, run / "checkpoints", run / "checkpoints" / "step-00000002"):
        proc = cli_inproc(["eval", "--checkpoint", str(source)])
        assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
        assert proc.stderr == f"fsdptrain: error: {run / 'config.yaml'}: train.max_steps: -3 is below the minimum 1\n"
    (run / "config.yaml").write_text("model:\n  hf_config: {model_type: llama}\ntrain:\n  max_steps: 3\n")
    proc = cli_inproc(["eval", "train.lerning_rate=1", "--checkpoint", str(run)])
    assert_one_line_error(proc, "override 'train.lerning_rate=1': unknown key 'train.lerning_rate'")
    proc = cli_inproc(["eval", "output_dir=ev1", "--checkpoint", str(run)])  # the config is fine: eval's own check
    assert_one_line_error(proc, f"--checkpoint: {run}: no complete checkpoint there")

    hf = tmp_path / "hf"  # a Hugging Face folder has no run config: CONFIG comes first
    hf.mkdir()
    proc = cli_inproc(["eval", "--checkpoint", str(hf)])
    assert proc.stderr == (f"fsdptrain: error: --checkpoint: {hf} is not a run directory or a checkpoint in one, so "
                           "there is no run config.yaml to evaluate with; give CONFIG first (the eval data and model "
                           f"settings): fsdptrain eval CONFIG [key=value ...] --checkpoint {hf}\n")
    proc = cli_inproc(["eval", "output_dir=ev1", "--checkpoint", str(hf)])
    assert proc.stderr == (f"fsdptrain: error: output_dir=ev1: this is a key=value override, and CONFIG comes first "
                           f"(--checkpoint {hf} is not a run directory with a config.yaml): fsdptrain eval CONFIG "
                           "output_dir=ev1 ...\n")


@pytest.mark.parametrize("command", ["train", "data", "config", "estimate", "eval"])
def test_a_config_file_after_an_override_gets_a_hint_that_config_comes_first(tmp_path, command):
    cfg = tmp_path / "my.yaml"
    cfg.write_text("train:\n  max_steps: 3\n")
    extra = ["--checkpoint", str(tmp_path)] if command == "eval" else []
    proc = cli_inproc([command, "train.lr=0.5", str(cfg), *extra])
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (f"fsdptrain: error: {cfg}: CONFIG comes first, then the key=value overrides: fsdptrain "
                           f"{command} {cfg} train.lr=0.5 ...\n")


def test_estimate_without_config_says_config_comes_first():
    proc = cli_inproc(["estimate", "train.lr=1"])
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == ("fsdptrain: error: train.lr=1: this is a key=value override, and CONFIG comes first (the "
                           "model and settings to estimate): fsdptrain estimate CONFIG train.lr=1 ...\n")


SIGNAL_LINES = r"""
import signal, sys
from fsdptrain.core import log
fired = [0]
def handler(*a):
    fired[0] += 1
    log.signal_line("S" * 40)
signal.signal(signal.SIGALRM, handler)
signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)  # a handler every half millisecond, mid-print
n = 0
while (n < 5000 or fired[0] < 200) and n < 2_000_000:  # enough handler lines however fast the machine writes
    log.rank_line("r" * 40)
    n += 1
signal.setitimer(signal.ITIMER_REAL, 0)
sys.stderr.write(f"{n} {fired[0]}\n")
"""


def test_lines_stay_whole_when_a_signal_handler_writes_mid_line(tmp_path):
    """A rank's lines and its signal handler's line (`got SIGTERM; saving...`) share the log file torchrun's
    ranks append to; unbuffered (as under `python -u`), print() writes a line and its newline apart, and a
    handler's line landed between them. Every line must come out whole."""
    import subprocess
    import sys

    from tests.helpers import REPO, env

    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        proc = subprocess.run([sys.executable, "-u", "-c", SIGNAL_LINES], stdout=f, stderr=subprocess.PIPE,
                              text=True, env=env(), cwd=REPO, check=True, timeout=120)
    written, fired = map(int, proc.stderr.split())
    lines = out.read_text().splitlines()
    assert fired >= 200  # the handler wrote mid-line often (a fast machine once gave only 10 in 5,000 lines)
    assert lines.count("r" * 40) == written and lines.count("S" * 40) == fired
    assert {x for x in lines} == {"r" * 40, "S" * 40}


def test_offload_that_the_nodes_host_memory_cannot_hold_is_one_line_before_the_weights_load(tmp_path, monkeypatch):
    """parallel.host_memory_check: the estimator's CPU line (what `fsdptrain estimate` prints for the same config)
    against MemAvailable, said in one line before the model is built; false starts anyway."""
    import re

    from fsdptrain.memory import stats

    args = ["parallel.optimizer_offload=true", "parallel.device=cpu", "train.max_steps=1", "data.synthetic_examples=64"]
    est = run_cli(["estimate", str(REPO / "fsdptrain" / "demo.yaml"), *args, "--nnodes", "1", "--gpus-per-node", "1"])
    assert est.returncode == 0, est.stderr
    per_rank = re.search(r"^CPU \(offload\): (.+?) per rank", est.stdout, re.M).group(1)
    monkeypatch.setattr(stats, "available_host_bytes", lambda: (5 << 20, "MemAvailable"))  # less than ~12 MiB
    proc = cli_inproc(["train", *args, f"output_dir={tmp_path / 'run'}"])
    assert_one_line_error(proc, f"parallel.optimizer_offload: this rank needs about {per_rank} of host memory "
                                "(AdamW state and its staging) and 5.00 MiB is available (MemAvailable); use more "
                                "nodes, parallel.optimizer_offload=nvme (the state on a drive), or set "
                                "parallel.host_memory_check=false to start anyway")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    proc = cli_inproc(["train", *args, "parallel.host_memory_check=false", f"output_dir={tmp_path / 'run2'}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [m["step"] for m in read_metrics(tmp_path / "run2")] == [1]


def test_the_host_memory_line_counts_every_rank_of_the_node_and_says_what_helps(monkeypatch, capsys):
    from fsdptrain import trainer
    from fsdptrain.config.schema import load_config
    from fsdptrain.core.errors import UserError
    from fsdptrain.dist.distributed import DistInfo
    from fsdptrain.memory import stats

    info = DistInfo(rank=9, local_rank=1, world_size=16, local_world_size=8, device=torch.device("cpu"),
                    backend="gloo", owns_group=False)
    monkeypatch.setattr(stats, "available_host_bytes", lambda: (1 << 20, "MemAvailable"))
    cases = {("parallel.optimizer_offload=nvme", "parallel.offload_dir=/x"):
             "parallel.optimizer_offload: the 8 ranks on this node need about {} of host memory ({} each: the "
             "stream's buffers) and 1.00 MiB is available (MemAvailable); use more nodes, a smaller "
             "parallel.offload_buffer_size, or set parallel.host_memory_check=false to start anyway",
             ("parallel.optimizer_offload=true",): None}
    for overrides, text in cases.items():
        cfg = load_config(None, list(overrides))
        predicted = trainer.offload_estimate(cfg, info)
        need = predicted.cpu_per_rank
        assert need and need > (1 << 20) // 8
        with pytest.raises(UserError) as e:
            trainer.check_host_memory(cfg, info, predicted)
        if text:
            from fsdptrain.core.units import format_bytes

            assert str(e.value) == text.format(format_bytes(8 * need), format_bytes(need))
        cfg = load_config(None, [*overrides, "parallel.host_memory_check=false"])
        trainer.check_host_memory(cfg, info, trainer.offload_estimate(cfg, info))  # skipped
    monkeypatch.setattr(stats, "available_host_bytes", lambda: None)  # nothing to read: skipped, said once
    capsys.readouterr()
    cfg = load_config(None, ["parallel.optimizer_offload=true"])
    trainer.check_host_memory(cfg, info, trainer.offload_estimate(cfg, info))
    out = capsys.readouterr()
    assert (out.out + out.err).strip().splitlines()[-1] == ("parallel.host_memory_check: skipped (no /proc/meminfo "
                                                            "or memory cgroup to read)")


def test_available_host_memory_is_the_lower_of_memavailable_and_the_memory_cgroups_headroom(tmp_path):
    """A Slurm job's or a container's memory cgroup limits the process below the node's MemAvailable: v1's memory
    controller and v2's unified hierarchy, the least headroom over the cgroup and its ancestors that set a limit."""
    from fsdptrain.memory.stats import available_host_bytes, cgroup_headroom

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       100000000 kB\nMemAvailable:    80000000 kB\n")
    root = tmp_path / "cg"
    # v2: the job's cgroup (64 GiB, 10 GiB used) under a slice without a limit under one of 60 GiB (5 used)
    job = root / "system.slice" / "job42"
    job.mkdir(parents=True)
    (job / "memory.max").write_text(f"{64 << 30}\n")
    (job / "memory.current").write_text(f"{10 << 30}\n")
    (root / "system.slice" / "memory.max").write_text("max\n")
    (root / "system.slice" / "memory.current").write_text(f"{12 << 30}\n")
    (root / "memory.max").write_text(f"{60 << 30}\n")
    (root / "memory.current").write_text(f"{5 << 30}\n")
    v2 = tmp_path / "cgroup-v2"
    v2.write_text("0::/system.slice/job42\n")
    assert cgroup_headroom(str(v2), str(root)) == 54 << 30  # 64 - 10, and 60 - 5 above it: 54
    assert available_host_bytes(str(meminfo), str(v2), str(root)) == (54 << 30, "the memory cgroup's limit less its "
                                                                               "usage")
    # v1 (with a v2 line beside it, as on hybrid hosts): the memory controller's files; unlimited is 2**63 - 4096
    mem = root / "memory" / "slurm" / "job7"
    mem.mkdir(parents=True)
    (mem / "memory.limit_in_bytes").write_text(f"{200 << 30}\n")
    (mem / "memory.usage_in_bytes").write_text(f"{1 << 30}\n")
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (root / "memory" / "memory.usage_in_bytes").write_text(f"{3 << 30}\n")
    v1 = tmp_path / "cgroup-v1"
    v1.write_text("4:memory:/slurm/job7\n0::/\n")
    assert cgroup_headroom(str(v1), str(root)) == 199 << 30
    assert available_host_bytes(str(meminfo), str(v1), str(root)) == (80000000 * 1024, "MemAvailable")  # lower
    none = tmp_path / "cgroup-none"
    none.write_text("4:memory:/elsewhere\n")  # no limit anywhere on its way up
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_headroom(str(none), str(root)) is None
    assert available_host_bytes(str(tmp_path / "missing"), str(tmp_path / "missing"), str(root)) is None
