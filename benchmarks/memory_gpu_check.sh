#!/usr/bin/env bash
# Memory checks for a GPU machine (a few minutes on one H100/H200):
#   1. the CUDA-only memory tests (allocator records, snapshot at a step, real OOM post-mortem, snapshot round trip);
#   2. predicted vs measured peak per rank (goal: within 10%), 1 GPU, then 2 ranks if 2 GPUs are visible.
# Output goes to ${OUT:-gpu_results}/.
set -uo pipefail
cd "$(dirname "$0")/.."
RES=${OUT:-gpu_results}
mkdir -p "$RES"
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
timeout 180 python3 -m pytest -q -o addopts="-ra" tests/test_memory.py -k "cuda" 2>&1 | tee "$RES/memory_cuda_tests.txt" | tail -3
timeout 300 python3 benchmarks/memory_estimate.py --steps 3 2>&1 | tee "$RES/memory_estimate.txt" | grep -E "^\||^predicted|^CPU"
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
    timeout 300 torchrun --nproc-per-node 2 benchmarks/memory_estimate.py --steps 3 2>&1 \
        | tee "$RES/memory_estimate_2gpu.txt" | grep -E "^\||^predicted"
fi
