"""benchmarks/gpu_check.sh, dry run on the CPU: the script a lent GPU runs once must not break there.

The GPU session has minutes, not hours, so every stage (CUDA tests, throughput
table with the issue-7 variants, estimator vs measured, optimizer offload across a
resume) runs here on the tiny demo model, with aot_eager instead of inductor, and
the short table it prints last must hold a row for every configuration and no
failure. (The 2-GPU stage needs two GPUs and is skipped here.)
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow  # see docs/testing.md: the quick loop is -m "not slow"

ROWS = ["fsdptrain", "hand-written FSDP2", "fsdptrain compile+chunked", "fsdptrain selective-AC+compile+chunked",
        "fsdptrain full-AC+compile+chunked", "fsdptrain optimizer-offload+compile+chunked"]


def test_gpu_check_script_runs_every_stage_on_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_PRESET": "demo", "GPU_CHECK_COMPILE_BACKEND": "aot_eager",
           "GPU_CHECK_CHUNK": "64", "CUDA_VISIBLE_DEVICES": "", "GPU_CHECK_LIMIT_SCALE": "4",
           "GPU_CHECK_LOSS_ARGS": "--tokens 256 --hidden 32 --vocab 500 --chunk 64 --repeats 1"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    tail = out[out.index("== reference"):]
    names = [line.split("|")[1].strip() for line in tail.splitlines() if line.startswith("| ") and "---" not in line]
    assert names == ["loop", *ROWS], tail
    assert "failed" not in tail and "did not finish" not in tail
    estimator_rows = [line for line in out[out.index("== memory estimator"):out.index("== reference")].splitlines()
                      if line.startswith("| ") and "---" not in line and "config" not in line]
    assert len(estimator_rows) == 5, out
    loss_rows = [line.split("|")[1].strip() for line in out[out.index("== loss head"):out.index("== memory estimator")]
                 .splitlines() if line.startswith("| ") and "---" not in line]
    assert loss_rows == ["loss head", "full logits", "checkpointed chunks", "fused chunks (fsdptrain)"], out
    assert sorted(os.listdir(tmp_path)) == ["compile_log.txt", "cuda_tests.txt", "env.txt", "loss_head.txt",
                                            "memory_estimate.txt", "offload_resume.txt", "throughput.txt",
                                            "throughput_table.txt"]  # no cut.txt: no stage ran out of time
    # every finished run was also reported as it ended, for a run cut short by its timeout
    assert sum(line.startswith("row: ") for line in (tmp_path / "throughput_table.txt").read_text().splitlines()) == 6
    offload = out[out.index("== optimizer offload"):out.index("== compile logs")].splitlines()[1:]
    assert offload[:2] == ["optimizer_offload resume: state after the load: cpu float32 (exp_avg, exp_avg_sq, step)",
                           "optimizer_offload resume: state after step 3: cpu float32 (exp_avg, exp_avg_sq, step)"]
    resumed, uninterrupted = offload[2].split("resumed ")[1].split(", uninterrupted ")
    assert resumed == uninterrupted  # the resumed step 3 is the uninterrupted run's
    assert "graph breaks" in out[out.index("== compile logs"):] and "recompiles (details: compile_log.txt)" in out
    assert "selective-AC+compile / full-AC+compile step time = " in tail
