"""CUDA-only checks (skipped without a GPU): bf16 training, offload paths, chunked-loss memory, compile + AC,
compiled fused loss in bf16, auto checkpointing from the GPU's memory."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import read_metrics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run(tmp_path, name, *overrides, steps=30):
    from fsdptrain.config.schema import load_config
    from fsdptrain.trainer import train

    cfg = load_config(None, [f"output_dir={tmp_path / name}", f"train.max_steps={steps}", "logging.progress=none",
                             "logging.tensorboard=false", "data.synthetic_examples=2000", *overrides])
    return train(cfg)


def test_bf16_mixed_training_learns_on_gpu(tmp_path):
    r = run(tmp_path, "bf16")
    assert all(map(lambda x: x == x, r.losses))
    assert r.losses[-1] < 0.8 * r.losses[0]
    assert "mfu" in read_metrics(tmp_path / "bf16")[-1]


@pytest.mark.parametrize("extra", [["parallel.cpu_offload=true"], ["parallel.optimizer_offload=true"]])
def test_offload_paths_match_plain_training(tmp_path, extra):
    base = run(tmp_path, "plain", "parallel.precision=fp32", steps=10)
    off = run(tmp_path, "offload", "parallel.precision=fp32", *extra, steps=10)
    assert max(abs(a - b) for a, b in zip(base.losses, off.losses)) < 1e-4


def test_optimizer_offload_keeps_state_off_the_gpu(tmp_path):
    plain = run(tmp_path, "p", "model.hf_config.hidden_size=512", "model.hf_config.intermediate_size=1536", steps=4)
    off = run(tmp_path, "o", "model.hf_config.hidden_size=512", "model.hf_config.intermediate_size=1536",
              "parallel.optimizer_offload=true", steps=4)
    assert off.peak_mem_bytes < plain.peak_mem_bytes


def test_nvme_offload_matches_in_memory_offload_on_gpu(tmp_path):
    """optimizer_offload nvme on CUDA (pinned staging, asynchronous copies, moments streamed from a file): the
    in-memory offload's losses (up to the GPU's own run-to-run nondeterminism), no more GPU memory, files gone."""
    mem = run(tmp_path, "mem", "parallel.precision=fp32", "parallel.optimizer_offload=true", steps=6)
    nvme = run(tmp_path, "nvme", "parallel.precision=fp32", "parallel.optimizer_offload=nvme",
               f"parallel.offload_dir={tmp_path / 'off'}", "parallel.offload_buffer_size=8MiB", steps=6)
    assert max(abs(a - b) for a, b in zip(mem.losses, nvme.losses)) < 1e-4
    assert nvme.peak_mem_bytes <= mem.peak_mem_bytes
    assert list((tmp_path / "off").iterdir()) == []


def test_chunked_loss_lowers_peak_memory_for_a_large_vocabulary(tmp_path):
    big = ["model.hf_config.vocab_size=65536", "train.micro_batch_size=16", "data.max_length=128"]
    full = run(tmp_path, "full", *big, steps=3)
    chunked = run(tmp_path, "chunked", *big, "train.loss_chunk_tokens=256", steps=3)
    assert chunked.peak_mem_bytes < 0.8 * full.peak_mem_bytes
    assert max(abs(a - b) for a, b in zip(full.losses, chunked.losses)) < 2e-2  # bf16 compute, different order


def test_compiled_blocks_with_checkpointing_and_varying_lengths(tmp_path):
    r = run(tmp_path, "compiled", "parallel.compile=true", "parallel.activation_checkpointing=full", steps=12)
    assert r.losses[-1] < r.losses[0]


def test_compiled_fused_loss_in_bf16_matches_full_logits(tmp_path):
    full = run(tmp_path, "full", "parallel.compile=true", steps=8)
    fused = run(tmp_path, "fused", "parallel.compile=true", "train.loss_chunk_tokens=96", steps=8)
    assert max(abs(a - b) for a, b in zip(full.losses, fused.losses)) < 2e-2  # bf16 compute, different order


def test_auto_checkpointing_plans_from_the_gpu_memory(tmp_path, capsys):
    run(tmp_path, "auto", "parallel.activation_checkpointing=auto", steps=3)
    out = capsys.readouterr().out
    assert "activation checkpointing auto: blocks 0-3 none; estimated peak" in out and "(fits)" in out
    run(tmp_path, "auto_small", "parallel.activation_checkpointing=auto", "parallel.memory_budget_gib=0.001", steps=3)
    assert "activation checkpointing auto: blocks 0-3 full;" in capsys.readouterr().out
