"""Buffers through random init, checkpoint and both exports (DeepSeek-V3's router e_score_correction_bias).

Buffers after loading a folder (Gemma's embed_scale, RoPE inv_freq, the router bias) equal from_pretrained's for
every family, and exports of loaded models reload without missing keys: see the family matrix
(tests/test_family_matrix.py). Here: a randomly initialised model, whose persistent buffer keeps its constructor
value through the checkpoint and both exports.
"""

from __future__ import annotations

import json

import torch

from tests.helpers import FAMILIES


def test_random_init_buffer_survives_checkpoint_and_export(tmp_path):
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from fsdptrain.cli import main
    from fsdptrain.config.schema import load_config
    from fsdptrain.trainer import train

    run = tmp_path / "run"
    source = [f"model.hf_config={json.dumps(FAMILIES['deepseek_v3'])}", "model.random_init=true"]
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
    assert buffers
    for key in buffers:  # the router's correction bias: through checkpoint and export unchanged
        assert torch.equal(written[key], load_file(str(run / "hf" / "model.safetensors"))[key]), key
        assert torch.equal(written[key], torch.zeros_like(written[key])), key
