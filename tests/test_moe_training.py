"""MoE training: the router's auxiliary loss in the objective, expert-load statistics, the estimator's MoE terms.

Single-process here (a one-rank group): the objective and its gradients equal transformers' own `outputs.loss`
(cross-entropy + router_aux_loss_coef x load-balancing loss) and its backward. The 2-rank checks (routed-token counts
exact against transformers' router outputs, model-state terms exact against real MoE shards) run in
test_moe_loading.py's launch (tests/workers/moe_load.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from fsdptrain.core.errors import ConfigError
from fsdptrain.data.encode import IGNORE, Example
from tests.helpers import first_block_saved_bytes, make_model_dir

BASE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": False}
# router_aux_loss_coef large, so a wrong aux scaling shows far above the tolerance
AUX_ARCHS = {
    "mixtral": {"model_type": "mixtral", **BASE, "num_local_experts": 4, "num_experts_per_tok": 2,
                "router_aux_loss_coef": 0.7},
    "qwen3_moe": {"model_type": "qwen3_moe", **BASE, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 16, "decoder_sparse_step": 1, "mlp_only_layers": [],
                  "router_aux_loss_coef": 0.7},
    "gpt_oss": {"model_type": "gpt_oss", **BASE, "num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 8,
                "layer_types": ["full_attention", "sliding_attention"], "sliding_window": 16,
                "router_aux_loss_coef": 0.7},
}
DEEPSEEK_V3 = {"model_type": "deepseek_v3", **BASE, "n_routed_experts": 4, "num_experts_per_tok": 2,
               "moe_intermediate_size": 16, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
               "n_shared_experts": 1, "kv_lora_rank": 16, "q_lora_rank": None, "qk_rope_head_dim": 8,
               "qk_nope_head_dim": 8, "v_head_dim": 16, "num_key_value_heads": 4}  # MLA: no grouped k/v


def examples(vocab: int, n: int = 4) -> list[Example]:
    """Rows of different lengths (so micro-batches are padded) with prompt tokens masked."""
    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(n):
        ids = torch.randint(3, vocab, (9 + 3 * i,), generator=g).tolist()
        out.append(Example(ids, [IGNORE] * 3 + ids[3:]))
    return out


def setup_run(folder: Path, tmp_path: Path, exs: list[Example], **train):
    from fsdptrain import trainer
    from fsdptrain.config.schema import load_config
    from fsdptrain.dist import distributed

    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "seed": 0,
        "model": {"path": str(folder), "attn_implementation": "eager"},  # gpt_oss refuses sdpa
        "data": {"shuffle": False, "max_length": 64},
        "train": {"max_steps": 1, "micro_batch_size": 2, "grad_accum_steps": 1, **train},
        "parallel": {"device": "cpu", "precision": "fp32"}, "logging": {"tensorboard": False, "progress": "none"}}))
    cfg = load_config(str(tmp_path / "cfg.yaml"))
    info = distributed.init("cpu")
    return trainer.setup(cfg, info, exs), info


def hf_labels(ours: torch.Tensor) -> torch.Tensor:
    """transformers shifts labels itself: its labels[t + 1] is our labels[t] (the target of position t)."""
    return torch.cat([torch.full_like(ours[:, :1], IGNORE), ours[:, :-1]], dim=1)


def our_step(folder: Path, tmp_path: Path, exs: list[Example], **train):
    """fsdptrain's forward_backward of step 1 on one rank: (CE sum, aux sum, targets, grads, batches, coef)."""
    from fsdptrain import trainer
    from fsdptrain.data import pipeline
    from fsdptrain.dist import distributed

    run, info = setup_run(folder, tmp_path, exs, **train)
    try:
        batches = next(iter(pipeline.batches(run.cfg, run.sampler, run.examples, run.tokenizer.pad_token_id, 0, 1,
                                             "cpu")))
        targets = sum(int((b["labels"] != IGNORE).sum()) for b in batches)
        run.model.train()
        sums = trainer.forward_backward(run, batches, torch.tensor(1.0 / targets))
        grads = {n: p.grad.full_tensor().clone() for n, p in run.model.named_parameters()}
        return sums.tolist(), targets, grads, batches, run.router_aux_coef
    finally:
        run.lock.release()
        distributed.shutdown(info)


@pytest.mark.parametrize("arch", list(AUX_ARCHS))
def test_objective_and_gradients_equal_transformers_loss(arch, tmp_path):
    """1 micro-batch: CE mean + coef x aux equals transformers' outputs.loss, and so do the gradients (also with the
    chunked loss head). 2 micro-batches (grad accumulation): the objective is CE over all targets + coef x the mean
    of the micro-batches' aux losses."""
    from transformers import AutoModelForCausalLM

    folder = make_model_dir(tmp_path / arch, AUX_ARCHS[arch])
    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).train()
    exs = examples(ref.config.vocab_size)
    # mixtral also with gradient accumulation, and with the chunked loss head (the loss comes back as `logits`)
    cases = [(1, 0), (2, 0), (1, 8)] if arch == "mixtral" else [(1, 0)]
    for accum, chunk in cases:
        (ce_sum, aux_sum), targets, grads, batches, coef = our_step(folder, tmp_path / f"a{accum}-{chunk}", exs,
                                                                    micro_batch_size=2 // accum,
                                                                    grad_accum_steps=accum, loss_chunk_tokens=chunk)
        assert coef == 0.7
        ref.zero_grad()
        total, ref_aux = 0.0, 0.0
        for b in batches:  # transformers' own objective per micro-batch, weighted like the trainer's
            n = int((b["labels"] != IGNORE).sum())
            out = ref(input_ids=b["input_ids"], labels=hf_labels(b["labels"]), output_router_logits=True)
            objective = (out.loss - coef * out.aux_loss) * n / targets + coef * out.aux_loss / accum
            objective.backward()
            total += objective.item()
            ref_aux += out.aux_loss.item()
            if accum == 1:
                assert math.isclose(ce_sum / targets + coef * aux_sum, out.loss.item(), rel_tol=1e-6, abs_tol=1e-6)
        assert math.isclose(ce_sum / targets + coef * aux_sum / accum, total, rel_tol=1e-6, abs_tol=1e-6)
        assert math.isclose(aux_sum, ref_aux, rel_tol=1e-6)
        for name, p in ref.named_parameters():
            assert torch.allclose(grads[name], p.grad, atol=1e-6, rtol=1e-5), (arch, accum, chunk, name)
    if arch != "mixtral":
        return
    # the aux loss does move the router: without it the router's gradient differs by far more than the tolerance
    _, _, plain, _, coef0 = our_step(folder, tmp_path / "off", exs, router_aux_loss_coef=0)
    assert coef0 == 0
    router = next(n for n in plain if n.endswith("layers.0.mlp.gate.weight") or n.endswith("router.weight")
                  or n.endswith("block_sparse_moe.gate.weight"))
    assert (plain[router] - grads[router]).abs().max() > 1e-3


def test_a_model_without_aux_loss_trains_without_it_and_refuses_a_coefficient(tmp_path):
    import json

    folder = make_model_dir(tmp_path / "dsv3", DEEPSEEK_V3)
    exs = examples(json.loads((folder / "config.json").read_text())["vocab_size"])
    (ce_sum, aux_sum), *_, coef = our_step(folder, tmp_path / "a", exs)
    assert (coef, aux_sum) == (0, 0.0) and ce_sum > 0
    from fsdptrain.dist import distributed

    info = distributed.init("cpu")
    try:
        with pytest.raises(ConfigError) as e:
            setup_run(folder, tmp_path / "b", exs, router_aux_loss_coef=0.01)
    finally:
        distributed.shutdown(info)
    assert str(e.value) == ("train.router_aux_loss_coef: model_type 'deepseek_v3' has no router auxiliary loss in "
                            "transformers (its router balances experts without one); set it to null or 0")


def test_summary_of_counts():
    from fsdptrain.model import moe

    counts = torch.tensor([[10, 30, 20, 20], [5, 5, 5, 65]])
    m = moe.summarize(counts)
    assert m == {"moe_tokens_per_expert_min": 5, "moe_tokens_per_expert_max": 65, "moe_tokens_per_expert_mean": 20.0,
                 "moe_imbalance": 65 / 20, "moe_imbalance_layer": 1}
    assert moe.imbalance_warning(3, m) is None  # a mean of 20 tokens per expert: too few to judge
    m = moe.summarize(counts * 10)
    assert moe.imbalance_warning(3, m) == (
        "step 3: MoE routing is unbalanced: in layer 1 the busiest expert got 3.2x the mean of 200 tokens per expert "
        "(min 50, max 650 over all layers); check train.router_aux_loss_coef")


SAVED = {"hidden_size": 56, "intermediate_size": 100, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 64, "vocab_size": 101, "tie_word_embeddings": False}


@pytest.mark.parametrize("arch", [
    {"model_type": "mixtral", **SAVED, "num_local_experts": 4, "num_experts_per_tok": 2},  # renormalised top-k
    {"model_type": "qwen2_moe", **SAVED, "num_experts": 5, "num_experts_per_tok": 3, "moe_intermediate_size": 24,
     "shared_expert_intermediate_size": 40, "mlp_only_layers": []},  # gated shared expert
], ids=["mixtral", "qwen2_moe"])
def test_moe_block_activations_equal_autograd_saved_tensors(arch):
    """The estimator's per-block activation bytes of an MoE block (top-k rows per token through the experts' MLP,
    router, shared expert) equal the bytes autograd saves for backward (fp32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fsdptrain.memory import estimate

    fields = dict(arch)
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).train()
    b, s = 2, 40
    saved = first_block_saved_bytes(model, b, s)
    shape = estimate.shape_of_model(model)
    assert shape.moe is not None and shape.moe.moe_blocks == (True, True)
    assert estimate.block_activation_bytes(shape, 4, "sdpa", s, b * s, True) == saved
    dense = estimate.block_activation_bytes(shape, 4, "sdpa", s, b * s, False)  # the same block with a dense MLP
    assert dense != saved
