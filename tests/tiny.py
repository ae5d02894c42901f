"""A tiny random config for any decoder type of the installed transformers, built from the type's defaults.

`tiny_fields(model_type)` shrinks every size field the default config has (hidden size 32, 2-4 heads, 4 experts,
2 per token, ranks and head dims 8-16, context 64; GPT-2-style names through the config's `attribute_map`), cuts
per-layer lists (`layer_types`, `mlp_layer_types`, ...) to the fewest layers that still hold every kind of layer
the default list has, so a hybrid model keeps one linear-attention and one full-attention layer, and sets dropout
probabilities to 0. `HINTS` are the few hand fields a type needs where the generic rule does not give a
consistent config. The result goes to `AutoConfig.for_model`, which recomputes the derived fields
(`qk_head_dim`, ...). Shared by tests/test_families.py and benchmarks/family_sweep.py.
"""

from __future__ import annotations

from typing import Any

# Size fields, by name, and their tiny value. A field a config does not have is not added.
SIZES: dict[str, int] = {
    "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "num_experts": 4, "n_routed_experts": 4, "num_local_experts": 4, "num_experts_per_tok": 2,
    "num_experts_per_token": 2, "n_shared_experts": 1, "num_shared_experts": 1, "max_position_embeddings": 64,
    "kv_lora_rank": 16, "q_lora_rank": 16, "o_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": 8, "linear_head_dim": 8, "linear_num_heads": 4, "linear_key_head_dim": 8,
    "linear_value_head_dim": 8, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "index_head_dim": 8, "index_n_heads": 2, "index_topk": 8, "mamba_num_heads": 4, "mamba_head_dim": 16,
    "ssm_state_size": 8, "state_size": 8, "mamba_d_state": 8, "n_mamba_heads": 2, "n_groups": 1, "chunk_size": 8,
    "time_step_rank": 4, "attention_head_dim": 8, "kv_channels": 8, "num_query_groups": 2, "adapter_rank": 4,
    "sliding_window": 8, "keep_window_size": 8, "model_max_length": 64, "n_group": 2, "num_expert_group": 2,
    "topk_group": 1, "o_groups": 2, "sliding_window_pattern": 2, "layer_group_size": 2,
}
# Fields of a per-layer kind, cut to the layers kept (the layer count itself follows them).
PER_LAYER = ("layer_types", "mlp_layer_types", "layers_block_type", "indexer_types", "expert_swiglu_limit_list",
             "share_expert_swiglu_limit_list")
MAX_LAYERS = 6

HINTS: dict[str, dict[str, Any]] = {
    # num_experts defaults to a number, is_moe off: keep the dense path but a tiny (unused) expert count
    "doge": {"num_experts": 4, "num_experts_per_tok": 2},
    # the output layer keeps `unpadded_vocab_size` rows of the vocabulary: all of the built-in tokenizer's 100
    # (inkling2_text's sliding layers also have head counts and sizes of their own, `swa_*`, 48 heads of 128 by
    # default; its default layer pattern is 5 sliding to 1 full: 2 layers hold one of each kind)
    "inkling_text": {"unpadded_vocab_size": 100},
    "inkling2_text": {"unpadded_vocab_size": 100, "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2,
                      "swa_head_dim": 8, "num_hidden_layers": 2, "layer_types": ["hybrid_sliding", "hybrid"]},
    "inkling2_loop_text": {"unpadded_vocab_size": 100},
    "codegen": {"rotary_dim": 4},  # at most the head dim (8)
    # its first shared-transformer ("hybrid") layer is the 7th: two of them in 4 layers
    "zamba2": {"num_hidden_layers": 4, "layers_block_type": ["linear_attention", "hybrid"] * 2, "n_mamba_heads": 8},
}


def _layers_needed(lists: dict[str, list]) -> int:
    """The fewest leading layers in which every per-layer list shows each of its kinds at least once."""
    need = 1
    for values in lists.values():
        firsts: dict[str, int] = {}
        for i, v in enumerate(values):
            firsts.setdefault(repr(v), i)
        need = max(need, max(firsts.values()) + 1)
    return min(need, MAX_LAYERS) if need > 1 else 2


def tiny_fields(model_type: str, vocab_size: int | None = None) -> dict[str, Any]:
    """The fields for `AutoConfig.for_model(model_type, **fields)` of a tiny model of this type (vocab_size: left
    to the caller when None, e.g. `tests.helpers.make_model_dir` sets the built-in tokenizer's)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    default = config.to_dict()
    # GPT-2-style configs name the sizes their own way (n_embd, n_layer, ...) and map the common names to them
    own = {v: k for k, v in getattr(config, "attribute_map", {}).items()}
    default.update({own[k]: v for k, v in list(default.items()) if k in own})
    fields: dict[str, Any] = {config.attribute_map.get(k, k): v for k, v in SIZES.items()
                              if isinstance(default.get(k), int) and not isinstance(default.get(k), bool)}
    lists = {k: default[k] for k in PER_LAYER  # by the config's own names only (an alias would set it twice)
             if k not in config.attribute_map and isinstance(default.get(k), list) and len(default[k]) > 1}
    layers = _layers_needed(lists)
    fields.update({k: v[:layers] for k, v in lists.items()})
    if "num_hidden_layers" in default:
        fields[config.attribute_map.get("num_hidden_layers", "num_hidden_layers")] = layers
    # dropout off: step 1 of training is compared with transformers' loss in eval mode
    fields.update({k: 0.0 for k, v in config.to_dict().items()
                   if any(w in k for w in ("dropout", "layerdrop", "pdrop")) and isinstance(v, float) and v > 0})
    for k in ("first_k_dense_replace",):
        if isinstance(default.get(k), int):
            fields[k] = min(default[k], 1)
    if "kv_lora_rank" in default and "num_key_value_heads" in fields:  # latent attention: one kv head per head
        fields["num_key_value_heads"] = fields.get("num_attention_heads", 4)
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if default.get(k) is not None:
            fields[k] = 0 if k == "pad_token_id" else (1 if k == "bos_token_id" else 2)
    fields["tie_word_embeddings"] = bool(default.get("tie_word_embeddings", False))
    for k, v in HINTS.get(model_type, {}).items():
        if v is None:
            fields.pop(k, None)
        else:
            fields[k] = v
    return {"model_type": model_type, **fields}
