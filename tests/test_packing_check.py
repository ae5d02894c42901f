"""data.packing is allowed only for models that keep packed examples apart (fsdptrain/packcheck.py).

gpt_oss (transformers 5.24) does not pass position_ids to its mask builder, so its packed rows get no
per-example mask: the check must refuse it, in one line, at start-up; llama and qwen2 pass.
"""

from __future__ import annotations

import json
import re

import pytest
from transformers import AutoConfig

from fsdptrain import trainer
from fsdptrain.config.schema import load_config
from fsdptrain.core.errors import ConfigError
from fsdptrain.data.tokenizer import build_char_tokenizer
from fsdptrain.model import packcheck
from tests.helpers import LLAMA, QWEN2, run_cli

GPT_OSS = {"model_type": "gpt_oss", "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4,
           "num_experts_per_tok": 2, "sliding_window": 8, "max_position_embeddings": 256}
REFUSED = re.compile(r"data\.packing: gpt_oss does not keep packed examples apart \(packed logits differ from the "
                     r"examples run alone by [0-9.e+-]+\); set data\.packing=false")


def hf_config(arch: dict):
    fields = dict(arch)
    return AutoConfig.for_model(fields.pop("model_type"), vocab_size=200, **fields)


@pytest.mark.parametrize("arch", [LLAMA, QWEN2], ids=["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama_and_qwen2_keep_packed_examples_apart(arch, attn):
    assert packcheck.packed_difference(hf_config(arch), attn) < packcheck.TOLERANCE
    packcheck.check_packing(hf_config(arch), attn)  # no error


def test_gpt_oss_is_refused_in_one_line():
    assert packcheck.packed_difference(hf_config(GPT_OSS), "sdpa") > 0.01
    with pytest.raises(ConfigError) as e:
        packcheck.check_packing(hf_config(GPT_OSS), "sdpa")
    assert REFUSED.fullmatch(str(e.value)), str(e.value)


def test_the_verdict_is_cached_per_model_class_and_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(packcheck, "_verdicts", {})
    monkeypatch.setattr(packcheck, "packed_difference", lambda *a: calls.append(a[1]) or 0.0)
    for attn in ("sdpa", "sdpa", "eager", "sdpa"):
        packcheck.check_packing(hf_config(LLAMA), attn)
    packcheck.check_packing(hf_config(QWEN2), "sdpa")
    assert calls == ["sdpa", "eager", "sdpa"]
    packcheck.check_packing(hf_config(GPT_OSS), "flash_attention_2")  # CUDA-only kernel: not checked
    assert len(calls) == 3


def test_the_check_runs_only_with_packing(monkeypatch):
    called = []
    monkeypatch.setattr(packcheck, "check_packing", lambda *a: called.append(a))
    tok = build_char_tokenizer()
    for packing in ("false", "true"):
        cfg = load_config(None, [f"model.hf_config={json.dumps(GPT_OSS)}", f"data.packing={packing}"])
        trainer.setup_hf_config(cfg, tok)
    assert len(called) == 1 and called[0][1] == cfg.model.attn_implementation


def test_cli_refuses_packing_for_gpt_oss(tmp_path):
    proc = run_cli(["train", f"model.hf_config={json.dumps(GPT_OSS)}", "model.random_init=true", "data.packing=true",
                    "train.max_steps=1", "data.synthetic_examples=16", "data.max_length=32",
                    "train.micro_batch_size=2", "parallel.device=cpu", "logging.progress=none",
                    "logging.tensorboard=false", f"output_dir={tmp_path / 'run'}"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fsdptrain: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert REFUSED.fullmatch(errors[0].removeprefix("fsdptrain: error: ")), errors[0]


def test_a_model_the_check_cannot_build_is_refused_in_one_line(monkeypatch):
    def broken(*a):
        raise RuntimeError("shapes\ndo not match")

    monkeypatch.setattr(packcheck, "_verdicts", {})
    monkeypatch.setattr(packcheck, "packed_difference", broken)
    with pytest.raises(ConfigError) as e:
        packcheck.check_packing(hf_config(LLAMA), "sdpa")
    assert str(e.value) == ("data.packing: cannot check that llama keeps packed examples apart (a tiny llama "
                            "failed: RuntimeError: shapes do not match); set data.packing=false")
