"""The analytic estimator (memory/estimate.py) against the fake-tensor trace of the real step (memory/trace.py).

Eleven configurations of a small Llama (one of them a Qwen3-MoE) at 8 ranks under torch's fake process group:
checkpointing none / full / every_k / selective / auto, the chunked loss, hybrid sharding with accumulation reduced
only on the last micro-step, accumulation with per-micro-step sync, fp32 and bf16-mixed, LoRA, freeze, optimizer
offload and a mixture-of-experts family with q/k norms (qwen3_moe). For each, on every group of ranks with equal
shards: the analytic peak is within 5% of the traced peak, and the model-state terms (sharded parameters, gradients,
optimizer state) are exact. cpu_offload, which cannot be traced, has its host-side model state checked against the
resident run's trace.

The dimensions are in proportion to real models (vocabulary 8x the hidden size, MLP 2.75x) so that no single term
swamps the others; fake tensors cost the same whatever their size. All traces run in this process (no torchrun).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fsdptrain.config.schema import load_config
from fsdptrain.memory import estimate as analytic
from fsdptrain.memory import trace
from tests.helpers import first_block_saved_bytes

LLAMA = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 3,
         "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 2048, "tie_word_embeddings": False}
# routed experts in every block, and q/k norms (which the estimator counts: test_qk_norms_... below)
QWEN3_MOE = {"model_type": "qwen3_moe", "hidden_size": 256, "intermediate_size": 704, "moe_intermediate_size": 176,
             "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32,
             "vocab_size": 2048, "num_experts": 8, "num_experts_per_tok": 2, "tie_word_embeddings": False,
             "decoder_sparse_step": 1, "mlp_only_layers": []}
BF16 = {"device": "cpu", "precision": "bf16-mixed"}
CHUNKED = {"micro_batch_size": 2, "loss_chunk_tokens": 256}
# name -> (nnodes, gpus per node, config)
CASES = {
    "fp32_none": (1, 8, {"parallel": {"device": "cpu", "precision": "fp32"}, "train": {"micro_batch_size": 2}}),
    "full_accum_sync": (1, 8, {"parallel": {**BF16, "activation_checkpointing": "full"},
                               "train": {**CHUNKED, "grad_accum_steps": 2}}),
    "every_k_chunked": (1, 8, {"parallel": {**BF16, "activation_checkpointing": "every_k",
                                            "activation_checkpointing_k": 2}, "train": CHUNKED}),
    "selective": (1, 8, {"parallel": {**BF16, "activation_checkpointing": "selective"},
                         "train": {"micro_batch_size": 2}}),
    "selective_chunked": (1, 8, {"parallel": {**BF16, "activation_checkpointing": "selective"}, "train": CHUNKED}),
    "auto": (1, 8, {"parallel": {**BF16, "activation_checkpointing": "auto", "memory_budget_gib": 0.04},
                    "train": CHUNKED}),
    "hybrid_no_sync": (2, 4, {"parallel": {**BF16, "sharding": "hybrid", "sync_grads_every_micro_step": False},
                              "train": {"micro_batch_size": 2, "grad_accum_steps": 2}}),
    "lora": (1, 8, {"parallel": BF16, "train": {"micro_batch_size": 2}, "finetune": {"method": "lora"}}),
    "freeze": (1, 8, {"parallel": BF16, "train": {"micro_batch_size": 2}, "finetune": {"method": "freeze"}}),
    "optimizer_offload": (1, 8, {"parallel": {**BF16, "optimizer_offload": True}, "train": {"micro_batch_size": 2}}),
    "qwen3_moe_chunked": (1, 8, {"parallel": BF16, "train": CHUNKED, "model": {"hf_config": QWEN3_MOE}}),
}


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, str]:
    root: Path = tmp_path_factory.mktemp("estvstrace")
    out = {}
    for name, (_, _, extra) in CASES.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"model": {"hf_config": LLAMA}, "data": {"max_length": 512}, **extra}))
        out[name] = str(path)
    return out


@pytest.fixture(scope="module")
def traced(configs) -> dict[str, trace.TraceReport]:
    out = {}
    for name, (nnodes, gpus, _) in CASES.items():
        out[name] = trace.run_trace(load_config(configs[name], []), nnodes, gpus, 80 << 30)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_analytic_peak_within_5_percent_and_model_state_exact(traced, name):
    rep = traced[name]
    assert sum(len(rt.ranks) for rt in rep.traces) == 8
    for rt in rep.traces:
        tr, est = rt.trace, rt.est
        assert abs(est.peak - tr.peak.total) <= 0.05 * tr.peak.total, (
            name, rt.ranks, est.peak, est.peak_phase, tr.peak.total, tr.peak.label)
        assert est.terms["parameters (sharded)"] == tr.category_max("parameters (sharded)")
        assert est.terms["gradients (sharded)"] == tr.category_max("gradients (sharded)")
        assert est.terms["optimizer state (AdamW m, v, step)"] == tr.category_max("optimizer state")
        assert est.state.optimizer == tr.optimizer_state  # on the GPU, or on the host with optimizer offload


def test_the_cases_exercise_what_they_name(traced):
    """Guards against a case silently degenerating (an auto plan of one mode, nothing frozen, no host state)."""
    auto = traced["auto"].traces[0].est.settings.block_modes
    assert len(set(auto)) > 1, auto  # a mixed per-block plan
    for name in ("lora", "freeze"):
        est = traced[name].traces[0].est
        assert 0 < est.state.trained_local < est.state.local_numel
    assert traced["freeze"].traces[0].est.shape.in_graph[0] is False  # its first blocks save nothing
    off = traced["optimizer_offload"]
    assert off.traces[0].est.terms["optimizer state (AdamW m, v, step)"] == 0 < off.traces[0].trace.optimizer_state
    assert any(n.startswith("parallel.optimizer_offload: traced with the state resident") for n in off.notes)
    moe = traced["qwen3_moe_chunked"].traces[0].est.shape
    assert moe.moe is not None and moe.qk_norm
    assert traced["hybrid_no_sync"].traces[0].est.settings.shard_world == 4


def test_cpu_offload_model_state_equals_the_trace_of_the_resident_run(configs, traced):
    """cpu_offload cannot be traced (one device): its host-side model state is checked against the trace of the
    same run with the state resident (optimizer offload: parameters and gradients on the device, the optimizer
    state's bytes from the host)."""
    rep = traced["optimizer_offload"]
    cfg = load_config(configs["optimizer_offload"], ["parallel.optimizer_offload=false", "parallel.cpu_offload=true"])
    est = analytic.estimate(cfg, 1, 8, 80 << 30)
    tr = rep.traces[0].trace
    assert (est.state.params, est.state.grads, est.state.optimizer) == (
        tr.category_max("parameters (sharded)"), tr.category_max("gradients (sharded)"), tr.optimizer_state)
    assert est.terms["parameters (sharded)"] == est.terms["gradients (sharded)"] == 0  # all on the host
    assert est.cpu_per_rank == est.state.total  # fused CPU AdamW: no full-size temporary


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_qk_norms_saved_tensors_equal_autograd(dtype):
    """Qwen3's per-head q/k norms save their fp32 input, an rsqrt per head and the normalised q and k: counted
    tensor by tensor against autograd's saved tensors of one block."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dt = getattr(torch, dtype)
    cfg = AutoConfig.for_model("qwen3", hidden_size=64, intermediate_size=176, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=100)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dt).train()
    b, s = 2, 40
    saved = first_block_saved_bytes(model, b, s)
    shape = analytic.shape_of_model(model)
    assert shape.qk_norm
    c = dt.itemsize
    assert analytic.block_activation_bytes_per_token(shape, c, "sdpa", s) * b * s == saved
