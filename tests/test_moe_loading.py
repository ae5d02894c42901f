"""MoE checkpoints in the hub's layout (one tensor per expert) load by transformers' own conversion rules.

transformers 5 saves `experts.N.w1.weight` one by one and fuses them into `experts.gate_up_proj` [E, 2I, H] while
loading; fsdptrain maps the file keys the same way (fsdptrain/weightmap.py) and each rank reads only its experts.
Before this, every such folder failed with "weight 'model.layers.0.mlp.experts.gate_up_proj' is missing".
That every MoE family's folder loads equal to from_pretrained on 2 ranks (each holding 2 of the 4 experts) is
checked by the family matrix (tests/test_family_matrix.py); here: damaged folders and refused rules.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from fsdptrain.errors import UserError
from tests.helpers import FAMILIES, make_model_dir

ARCHS = {name: FAMILIES[name] for name in ("mixtral", "qwen3_moe")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {name: make_model_dir(root / name, arch, seed=i) for i, (name, arch) in enumerate(ARCHS.items())}


def write_config(path: Path, folder: Path) -> str:
    path.write_text(yaml.safe_dump({"seed": 0, "model": {"path": str(folder)},
                                    "parallel": {"device": "cpu", "precision": "fp32"}}))
    return str(path)


def hf_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def load_one_rank(folder: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """fsdptrain's sharded model on one rank: its full parameters."""
    from fsdptrain import distributed, models
    from fsdptrain.build import build_sharded_model
    from fsdptrain.config import load_config

    cfg = load_config(write_config(tmp_path / "cfg.yaml", folder))
    info = distributed.init("cpu")
    try:
        hf = models.load_hf_config(cfg.model.path, None, None, False)
        model = build_sharded_model(cfg, info, hf).model
        return {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    finally:
        distributed.shutdown(info)


def copy_without(src: Path, dst: Path, drop) -> Path:
    """A copy of model folder `src` (config and weights) whose safetensors file lacks the keys `drop` selects."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if not drop(k)}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    return dst


def test_missing_expert_names_the_file_keys_looked_for(folders, tmp_path):
    """A truly missing weight: the error names the per-expert file keys, not only the fused parameter."""
    bad = copy_without(folders["mixtral"], tmp_path / "bad", lambda k: ".layers.1." in k and ".w3." in k)
    with pytest.raises(UserError) as e:
        load_one_rank(bad, tmp_path)
    msg = str(e.value)
    assert "model.layers.1.mlp.experts.gate_up_proj" in msg
    assert "model.layers.1.block_sparse_moe.experts.*.w3.weight" in msg, msg
    assert "\n" not in msg


def test_a_rule_that_cannot_be_read_by_shards_is_refused_naming_the_model_type(folders, tmp_path, monkeypatch):
    from transformers.core_model_loading import Chunk, MergeModulelist, WeightConverter

    from fsdptrain import weightmap

    real = weightmap.conversion_rules

    def odd_rules(model):  # mixtral's rules with down_proj split after stacking: not readable by rows
        return [WeightConverter(source_patterns=".experts.*.w2.weight", target_patterns=".experts.down_proj",
                                operations=[MergeModulelist(dim=0), Chunk(dim=1)])
                if "down_proj" in str(r.target_patterns) else r for r in real(model)]

    monkeypatch.setattr(weightmap, "conversion_rules", odd_rules)
    with pytest.raises(UserError) as e:
        load_one_rank(folders["mixtral"], tmp_path)
    msg = str(e.value)
    assert "model_type 'mixtral'" in msg and "Chunk" in msg and "\n" not in msg


def test_a_missing_expert_is_named(folders, tmp_path):
    bad = copy_without(folders["qwen3_moe"], tmp_path / "bad", lambda k: "layers.0.mlp.experts.2.down_proj" in k)
    with pytest.raises(UserError, match=r"'model.layers.0.mlp.experts.down_proj' has 4 experts.* 3 tensors"):
        load_one_rank(bad, tmp_path)


def test_a_dense_folder_still_loads_by_its_own_names(tmp_path):
    """No conversion rule applies to llama: each parameter is the file tensor of the same name (tied lm_head)."""
    folder = make_model_dir(tmp_path / "llama", FAMILIES["llama"])
    params = load_one_rank(folder, tmp_path)
    expected = dict(hf_model(folder).named_parameters())
    assert set(params) == set(expected)
    assert all(torch.equal(params[n], p.detach()) for n, p in expected.items())
