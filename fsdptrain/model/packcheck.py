"""Does this model keep packed examples apart? Checked once per model class before packing is allowed.

Packing (data/packing.py) puts several examples in one row with position_ids that restart at 0 for each and no
attention mask; transformers turns the restarting position_ids into a block-diagonal causal mask. Models whose
forward does not pass position_ids to their mask builder (gpt_oss in transformers 5.24) never build that mask,
so packed examples silently attend to one another. Rather than keep a list of such models, this runs the real
thing on a tiny random model of the same architecture: one packed row of two short examples, batched by the
loader's own `collate`, against the two examples run alone; the logits must agree.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from ..core.errors import ConfigError
from ..data.encode import Example
from ..data.loader import collate
from ..data.packing import pack

if TYPE_CHECKING:
    from transformers import PretrainedConfig

TOLERANCE = 1e-4
TINY_VOCAB = 128
_TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "vocab_size": TINY_VOCAB,
         # MoE: a few small experts
         "moe_intermediate_size": 128, "shared_expert_intermediate_size": 128,
         # multi-head latent attention (DeepSeek-style)
         "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16}
_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")
_verdicts: dict[tuple, float] = {}  # (config class, attn_implementation) -> max abs logit difference


def tiny_config(hf_config: PretrainedConfig) -> PretrainedConfig:
    """hf_config shrunk to a model that builds and runs in well under a second on the CPU."""
    fields = hf_config.to_dict()
    heads = 4
    kv = fields.get("num_key_value_heads")
    over = {k: v for k, v in _TINY.items() if k in fields}
    if "num_attention_heads" in fields:
        over["num_attention_heads"] = heads
    if kv is not None:  # keep the attention kind: multi-head, grouped or multi-query
        over["num_key_value_heads"] = heads if kv == fields.get("num_attention_heads") else (1 if kv == 1 else 2)
    if "head_dim" in fields:  # multi-head latent attention: head_dim is the rotary part of the query/key heads
        over["head_dim"] = _TINY["qk_rope_head_dim"] if "qk_rope_head_dim" in fields else 16
    if "qk_head_dim" in fields:
        over["qk_head_dim"] = _TINY["qk_rope_head_dim"] + _TINY["qk_nope_head_dim"]
    if fields.get("q_lora_rank") is not None:
        over["q_lora_rank"] = 16
    experts = [key for key in _EXPERT_COUNTS if fields.get(key)]
    over.update(dict.fromkeys(experts, 4))
    if experts and "num_experts_per_tok" in fields:
        over["num_experts_per_tok"] = 2
    if fields.get("n_group"):  # grouped routing (DeepSeek-V3): groups must divide the experts
        over.update(n_group=1, topk_group=1)
    for key in ("first_k_dense_replace", "mlp_only_layers"):
        if key in fields:
            over[key] = 0 if key == "first_k_dense_replace" else []
    if fields.get("sliding_window"):  # smaller than an example, so the window is checked too
        over["sliding_window"] = 4
    if fields.get("layer_types"):  # two layers, of every kind the model mixes (sliding and full, ...)
        kinds = list(dict.fromkeys(fields["layer_types"]))
        over["layer_types"] = (kinds + kinds)[:2]
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(fields.get(key), int) and fields[key] >= TINY_VOCAB:
            over[key] = 0
    fields.update(over)
    fields.pop("torch_dtype", None)
    fields.pop("dtype", None)
    return type(hf_config).from_dict(fields)


def _build(tiny, attn_implementation: str, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_config(tiny, attn_implementation=attn_implementation, dtype=torch.float32,
                                                trust_remote_code=trust_remote_code)
    except (ValueError, ImportError):  # this kernel refused here (the run itself reports it): check eager
        return AutoModelForCausalLM.from_config(tiny, attn_implementation="eager", dtype=torch.float32,
                                                trust_remote_code=trust_remote_code)


def packed_difference(hf_config: PretrainedConfig, attn_implementation: str, trust_remote_code: bool = False) -> float:
    """Max abs difference between the logits of two examples packed in one row and run alone (tiny fp32 model)."""
    tiny = tiny_config(hf_config)
    tiny.use_cache = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _build(tiny, attn_implementation, trust_remote_code).eval()
        lens = [7, 6]
        examples = [Example(ids, list(ids)) for ids in
                    (torch.randint(1, TINY_VOCAB, (n,)).tolist() for n in lens)]
    row = pack(examples, lens, sum(lens))
    assert len(row) == 1, "both examples fit one row"

    def logits(batch: dict) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "position_ids")}
        with torch.no_grad():
            return model(**inputs, use_cache=False).logits[0].float()

    packed = logits(collate([row[0]], pad_id=0))
    diff, at = 0.0, 0
    for ex, n in zip(row.unpacked(0), row[0].seq_lens):
        alone = logits(collate([ex], pad_id=0))
        diff = max(diff, (packed[at:at + n] - alone[:n]).abs().max().item())
        at += n
    return diff


def check_packing(hf_config: PretrainedConfig, attn_implementation: str, trust_remote_code: bool = False) -> None:
    """Refuse data.packing (one line) for a model whose packed examples see each other; cached per model class."""
    if attn_implementation.startswith("flash_attention"):
        # CUDA-only kernels: nothing to run on the CPU here; flash attention's varlen path reads the example
        # boundaries from position_ids (collate lays the rows end to end for it), so it is not checked.
        return
    key = (type(hf_config), attn_implementation)
    if key not in _verdicts:
        try:
            _verdicts[key] = packed_difference(copy.deepcopy(hf_config), attn_implementation, trust_remote_code)
        except Exception as e:  # a config this shrinking does not fit: unchecked packing could mix examples silently
            detail = " ".join(str(e).split())[:200]
            raise ConfigError(f"data.packing: cannot check that {hf_config.model_type} keeps packed examples apart "
                              f"(a tiny {hf_config.model_type} failed: {type(e).__name__}: {detail}); "
                              "set data.packing=false") from None
    diff = _verdicts[key]
    if not diff < TOLERANCE:
        raise ConfigError(f"data.packing: {hf_config.model_type} does not keep packed examples apart (packed logits "
                          f"differ from the examples run alone by {diff:.3g}); set data.packing=false")
