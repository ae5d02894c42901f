"""Model building on the meta device, block discovery across families, FLOP counting, sampler invariants."""

from __future__ import annotations

import pytest
import torch

from fsdptrain.data.encode import IGNORE, Example
from fsdptrain.data.loader import StepSampler, collate
from fsdptrain.model import models
from fsdptrain.train.optim import lr_factor, no_decay

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 128}


@pytest.mark.parametrize("family,block", [("llama", "LlamaDecoderLayer"), ("qwen2", "Qwen2DecoderLayer"),
                                          ("mistral", "MistralDecoderLayer"), ("gemma", "GemmaDecoderLayer")])
def test_blocks_found_for_each_family_without_memory(family, block):
    hf = models.load_hf_config(None, {"model_type": family, **SMALL}, None, False)
    model = models.build_meta_model(hf, "sdpa", torch.float32, False)
    blocks = models.find_blocks(model)
    assert [type(b).__name__ for b in blocks] == [block] * 3
    assert all(p.is_meta for p in model.parameters())


def test_flops_per_token_matches_the_reference_formula():
    # REFERENCE.md: Llama-3.2-1B shape has 1.236e9 compute params incl. lm_head
    hf = models.load_hf_config(None, {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
                                      "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                                      "num_key_value_heads": 8, "tie_word_embeddings": True}, None, False)
    model = models.build_meta_model(hf, "sdpa", torch.float32, False)
    n = models.count_params(model)
    f = models.flops_per_token(hf, n, 4096)
    assert abs((f - 12 * 16 * 2048 * 4096) / 6 - 1.236e9) / 1.236e9 < 1e-3


def test_global_batches_do_not_depend_on_world_size_and_ranks_are_disjoint():
    one = StepSampler(100, 1, 0, micro_batch_size=8, grad_accum_steps=1, seed=3)
    parts = [StepSampler(100, 4, r, micro_batch_size=1, grad_accum_steps=2, seed=3) for r in range(4)]
    for step in range(one.steps_per_epoch * 2):
        got = [i for s in parts for mb in s.rank_micro_batches(step) for i in mb]
        assert got == one.global_indices(step)
        assert len(set(got)) == 8
    assert one.steps_per_epoch == 12  # 100 // 8: the incomplete last global batch is dropped
    assert one.global_indices(0) != one.global_indices(12)  # a new epoch reshuffles


def test_too_little_data_is_a_clear_error():
    from fsdptrain.core.errors import UserError

    with pytest.raises(UserError, match=r"data: 5 examples cannot fill one global batch of 8"):
        StepSampler(5, 2, 0, micro_batch_size=4, grad_accum_steps=1, seed=0)


def test_collate_pads_to_multiple_of_8_and_shifts_labels():
    ex = [Example([5, 6, 7], [IGNORE, 6, 7]), Example(list(range(10, 20)), [IGNORE] * 5 + list(range(15, 20)))]
    b = collate(ex, pad_id=0)
    assert b["input_ids"].shape == (2, 16)
    assert b["labels"][0, :4].tolist() == [6, 7, IGNORE, IGNORE]
    assert b["labels"][1, 3:10].tolist() == [IGNORE, 15, 16, 17, 18, 19, IGNORE]
    assert int((b["labels"] != IGNORE).sum()) == ex[0].n_targets + ex[1].n_targets == 7
    assert int(b["n_tokens"]) == 13


def test_schedule_and_decay_groups():
    assert lr_factor(0, 100, 10, "cosine", 0.0) == pytest.approx(0.1)
    assert lr_factor(10, 100, 10, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 100, 10, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(99, 100, 0, "constant", 0.0) == 1.0
    assert no_decay("model.norm.weight", torch.zeros(4)) and no_decay("x.bias", torch.zeros(4))
    assert not no_decay("model.layers.0.mlp.up_proj.weight", torch.zeros(4, 4))
