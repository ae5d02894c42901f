"""benchmarks/gpu_check.sh, dry run on the CPU: the script a lent GPU runs once must not break there.

The GPU session has minutes, not hours, so every stage (CUDA tests, throughput
table with the issue-7 variants, estimator vs measured) runs here on the tiny
demo model, with aot_eager instead of inductor, and the short table it prints
last must hold a row for every configuration and no failure.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow  # see docs/testing.md: the quick loop is -m "not slow"

ROWS = ["fsdptrain", "hand-written FSDP2", "fsdptrain compile+chunked", "fsdptrain auto-AC-28GiB+compile+chunked",
        "fsdptrain optimizer-offload+compile+chunked", "fsdptrain selective-AC+compile+chunked",
        "fsdptrain full-AC+compile+chunked"]


def test_gpu_check_script_runs_every_stage_on_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_PRESET": "demo", "GPU_CHECK_COMPILE_BACKEND": "aot_eager",
           "GPU_CHECK_CHUNK": "64", "CUDA_VISIBLE_DEVICES": "",
           "GPU_CHECK_LOSS_ARGS": "--tokens 256 --hidden 32 --vocab 500 --chunk 64 --repeats 1"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          env=env, timeout=400)
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
    assert sorted(os.listdir(tmp_path)) == ["cuda_tests.txt", "env.txt", "loss_head.txt", "memory_estimate.txt",
                                            "throughput.txt", "throughput_table.txt"]
    # every finished run was also reported as it ended, for a run cut short by its timeout
    assert sum(line.startswith("row: ") for line in (tmp_path / "throughput_table.txt").read_text().splitlines()) == 7
