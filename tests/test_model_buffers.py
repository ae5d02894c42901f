"""Buffers after loading a model folder and in exports (Gemma's embed_scale, RoPE inv_freq, DeepSeek-V3's router
e_score_correction_bias): equal to transformers' own, and the loss too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import make_model_dir

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 128}
ARCHS = {
    "llama": {"model_type": "llama", **SMALL, "tie_word_embeddings": True},
    "qwen2": {"model_type": "qwen2", **SMALL, "tie_word_embeddings": False},
    "gemma": {"model_type": "gemma", **SMALL, "head_dim": 16},
    "gemma2": {"model_type": "gemma2", **SMALL, "head_dim": 16},
    "gemma3_text": {"model_type": "gemma3_text", **SMALL, "head_dim": 16},
    "deepseek_v3": {"model_type": "deepseek_v3", **SMALL, "num_key_value_heads": 4, "moe_intermediate_size": 32,
                    "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
                    "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1, "q_lora_rank": 32,
                    "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16},
}
EAGER = {"gemma2", "gemma3_text"}  # transformers refuses sdpa for gemma2; gemma3 warns


def hf_model(folder: Path, attn: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation=attn).eval()


# deepseek_v3's folder holds a random router correction bias (a persistent buffer): loading must read it.
@pytest.mark.parametrize("name", list(ARCHS))
def test_loaded_buffers_and_loss_equal_transformers(tmp_path, name):
    from fsdptrain import distributed, models
    from fsdptrain.build import build_sharded_model
    from fsdptrain.config import load_config

    folder = make_model_dir(tmp_path / name, ARCHS[name])
    attn = "eager" if name in EAGER else "sdpa"
    cfg = load_config(None, [f"model.path={folder}", f"model.attn_implementation={attn}", "parallel.device=cpu",
                             "parallel.precision=fp32", f"output_dir={tmp_path / 'run'}"])
    hf_config = models.load_hf_config(str(folder), None, None, False)
    info = distributed.init("cpu")
    try:
        ours = build_sharded_model(cfg, info, hf_config).model
        ref = hf_model(folder, attn)
        theirs = dict(ref.named_buffers())
        got = dict(ours.named_buffers())
        assert set(got) == set(theirs)
        for key, b in got.items():
            b = b.full_tensor() if hasattr(b, "full_tensor") else b
            assert torch.equal(b, theirs[key]), key
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, hf_config.vocab_size, (2, 24), generator=g)
        with torch.no_grad():
            loss = ours(input_ids=ids, labels=ids).loss
            expected = ref(input_ids=ids, labels=ids).loss
        assert abs(loss.item() - expected.item()) < 1e-5, (loss.item(), expected.item())
    finally:
        distributed.shutdown(info)


@pytest.mark.parametrize("name", ["gemma2", "deepseek_v3"])
def test_export_from_a_checkpoint_reloads_without_missing_keys(tmp_path, name):
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from fsdptrain.cli import main
    from fsdptrain.config import load_config
    from fsdptrain.trainer import train

    run = tmp_path / "run"
    if name == "deepseek_v3":  # random init (see above): the buffer keeps its constructor value
        source = [f"model.hf_config={json.dumps(ARCHS[name])}", "model.random_init=true"]
    else:
        folder = make_model_dir(tmp_path / name, ARCHS[name])
        source = [f"model.path={folder}"]
    train(load_config(None, [*source, "model.attn_implementation=eager", f"output_dir={run}",
                             "train.max_steps=1", "checkpoint.save_every=1", "data.synthetic_examples=16",
                             "data.max_length=32", "train.micro_batch_size=2", "parallel.device=cpu",
                             "logging.progress=none", "logging.tensorboard=false", "checkpoint.export_hf=true"]))
    out = tmp_path / "export"
    res = CliRunner().invoke(main, ["export", str(run), "--out", str(out), "--dtype", "fp32"])
    assert res.exit_code == 0, res.output
    from transformers import AutoModelForCausalLM

    for exported in (out, run / "hf"):  # from the checkpoint, and the live model's export at the end of training
        model, loading = AutoModelForCausalLM.from_pretrained(str(exported), output_loading_info=True,
                                                              attn_implementation="eager")
        assert not loading["missing_keys"] and not loading["unexpected_keys"], (exported, loading)
    written = load_file(str(out / "model.safetensors"))
    buffers = [k for k, _ in model.named_buffers() if k in model.state_dict()]
    assert bool(buffers) == (name == "deepseek_v3")
    for key in buffers:  # the router's correction bias: through checkpoint and export unchanged
        assert torch.equal(written[key], load_file(str(run / "hf" / "model.safetensors"))[key]), key
        assert torch.equal(written[key], torch.zeros_like(written[key])), key
