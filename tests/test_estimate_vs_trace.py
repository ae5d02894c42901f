"""The analytic estimator (memory/estimate.py) against the fake-tensor trace of the real step (memory/trace.py).

Eighteen configurations of a small Llama (one of them a Qwen3-MoE) at 8 ranks under torch's fake process group:
checkpointing none / full / every_k / selective / auto, the chunked loss, hybrid sharding with accumulation reduced
only on the last micro-step, accumulation with per-micro-step sync, fp32 and bf16-mixed, LoRA, freeze, optimizer
offload, a mixture-of-experts family with q/k norms (qwen3_moe), preference training (dpo: two rows per pair; full
fine-tuning with its frozen reference copy, also with accumulation and auto checkpointing; LoRA, whose reference is
the policy with its adapters off; freeze), a reward model (rm) and context parallelism (CP=2, packed rows). For each,
on every group of ranks with equal shards: the analytic peak is within 5% of the traced peak, and the model-state
terms (sharded parameters, the reference's included, gradients, optimizer state) are exact. cpu_offload, which cannot
be traced, has its host-side model state checked against the resident run's trace; the reference-weights line equals
the reference model's sharded bytes, padded shards too; auto checkpointing plans with the reference.

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
    # a micro-batch of 1 pair is 2 rows; full fine-tuning builds the frozen reference copy
    "dpo_full": (1, 8, {"parallel": BF16, "train": {"micro_batch_size": 1, "objective": "dpo"}}),
    "dpo_full_accum_auto": (1, 8, {"parallel": {**BF16, "activation_checkpointing": "auto", "memory_budget_gib": 0.046},
                                   "train": {"micro_batch_size": 1, "grad_accum_steps": 2, "objective": "dpo"}}),
    "dpo_lora": (1, 8, {"parallel": BF16, "train": {"micro_batch_size": 1, "objective": "dpo"},
                        "finetune": {"method": "lora"}}),
    # freeze: the reference swaps the trainable shards as loaded in (a kept copy of them)
    "dpo_freeze": (1, 8, {"parallel": BF16, "train": {"micro_batch_size": 1, "objective": "dpo"},
                          "finetune": {"method": "freeze"}}),
    # a reward model: the score head (hidden x 1) in place of the lm_head and its logits, no reference
    "rm": (1, 8, {"parallel": BF16, "train": {"micro_batch_size": 1, "objective": "rm"}}),
    "kto_full": (1, 8, {"parallel": BF16, "train": {"micro_batch_size": 1, "objective": "kto"}}),
    # context parallelism: each rank traces its half of the packed rows, the Ulysses attention exchanging over a
    # fake group, and the whole rows' document mask (saved by sdpa in every block)
    "cp2_packed": (1, 8, {"parallel": {**BF16, "context_parallel": 2}, "train": {"micro_batch_size": 2},
                          "data": {"max_length": 512, "packing": True}}),
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
        reference = est.terms["reference weights (sharded, frozen)"]
        assert est.terms["parameters (sharded)"] + reference == tr.category_max("parameters (sharded)")
        assert reference == tr.reference_weights
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
    full, lora = traced["dpo_full"].traces[0], traced["dpo_lora"].traces[0]
    assert full.shapes[0] == [(2, 512)] and full.est.settings.reference == "copy"  # one pair: two rows
    assert full.est.terms["reference weights (sharded, frozen)"] > 0
    assert lora.est.settings.reference == "adapters-off" and lora.trace.reference_weights == 0
    assert len(set(traced["dpo_full_accum_auto"].traces[0].est.settings.block_modes)) > 1
    assert traced["dpo_freeze"].traces[0].trace.reference_weights > 0
    kto = traced["kto_full"].traces[0].est  # an example and its KL row, against a frozen copy
    assert kto.settings.micro_batch == 2 and kto.settings.reference == "copy"
    rm = traced["rm"].traces[0].est
    assert rm.shape.lm_head_numel == 0 and rm.settings.reference is None
    assert rm.terms["logits + loss (forward)"] < rm.terms["activations (saved for backward)"] // 100
    cp = traced["cp2_packed"].traces[0]  # a chunk of 256 of each row of 512, the exchange and the mask counted
    assert cp.shapes[0] == [(2, 512)] and cp.est.settings.local_seq == 256
    assert cp.est.terms[analytic.ULYSSES_TERM] > 0 and analytic.document_mask_bytes(cp.est.settings, 2) > 0


def test_auto_checkpointing_plans_with_the_reference_and_two_rows_per_pair(configs):
    """The trainer's plan (plan_auto_checkpointing, on the built policy) is the estimate's, and it pays for the
    reference and the pair's second row: the same budget gives sft on one row per pair less recomputation, and
    the reference-free orpo no more than sigmoid."""
    import torch

    from fsdptrain.model import models

    def plan(*overrides: str) -> tuple[str, ...]:
        cfg = load_config(configs["dpo_full_accum_auto"], list(overrides))
        est = analytic.estimate(cfg, 1, 8, 80 << 30)
        hf = models.load_hf_config(None, LLAMA, None, False)
        model = models.build_meta_model(hf, "sdpa", torch.float32, False)
        modes, _ = analytic.plan_auto_checkpointing(cfg, model, 8, 8, torch.device("cpu"))
        assert tuple(modes) == est.settings.block_modes
        return est.settings.block_modes

    order = {"none": 0, "selective": 1, "full": 2}

    def cost(modes: tuple[str, ...]) -> int:
        return sum(order[m] for m in modes)

    dpo, sft = plan(), plan("train.objective=sft")
    orpo = plan("preference.loss=orpo")
    assert cost(sft) < cost(dpo) and cost(orpo) <= cost(dpo), (sft, orpo, dpo)


def test_reference_weights_line_equals_the_reference_models_sharded_bytes(tmp_path):
    """Full fine-tuning's reference: every parameter's padded shard in bf16 under bf16-mixed (the vocabulary of
    301 rows gives rank 1 fewer rows than its padded buffer); freeze's: its trainable shards as loaded, unpadded,
    in fp32. Against the bytes of what build_reference makes, on both ranks."""
    path = tmp_path / "ref.yaml"
    tiny = {**LLAMA, "hidden_size": 64, "intermediate_size": 100, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 301, "num_hidden_layers": 2}
    for method, bytes_per in (("full", 2), ("freeze", 4)):
        path.write_text(yaml.safe_dump({"model": {"hf_config": tiny}, "data": {"max_length": 16},
                                        "parallel": BF16, "finetune": {"method": method},
                                        "train": {"objective": "dpo"}}))
        rep = trace.run_trace(load_config(str(path), []), 1, 2, 80 << 30)
        assert sorted(r for rt in rep.traces for r in rt.ranks) == [0, 1]
        for rt in rep.traces:
            rank = rt.ranks[0]
            est = analytic.compute(rt.est.shape, rt.est.settings, rank)
            line = est.terms["reference weights (sharded, frozen)"]
            assert line == rt.trace.reference_weights > 0, (method, rank)
            st = est.state
            assert line == (st.padded_numel * bytes_per if method == "full" else st.trained_local * bytes_per)
            assert f"  {'reference weights (sharded, frozen)':<44}" in analytic.render(est)
        if method == "full":  # rank 1 holds fewer rows, in a padded buffer as large as rank 0's
            assert len(rep.traces) == 2 and len({rt.trace.reference_weights for rt in rep.traces}) == 1


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
    # on the host: the shards, the gradients (unpadded) and AdamW's state (fused CPU AdamW: no full-size
    # temporary); unpinned, as the config's device is the CPU (CUDA's pinned rounding: tests/test_memory.py)
    assert est.settings.facts.device_type == "cpu"
    assert est.cpu_per_rank == est.state.params + 4 * est.state.local_numel + est.state.optimizer


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
