"""MoE checkpoints in the hub's layout (one tensor per expert) load by transformers' own conversion rules.

transformers 5 saves `experts.N.w1.weight` one by one and fuses them into `experts.gate_up_proj` [E, 2I, H] while
loading; fsdptrain maps the file keys the same way (fsdptrain/weightmap.py) and each rank reads only its experts.
Before this, every such folder failed with "weight 'model.layers.0.mlp.experts.gate_up_proj' is missing".
That every MoE family's folder loads equal to from_pretrained on 2 ranks (each holding 2 of the 4 experts) is
checked by the family matrix (tests/test_family_matrix.py); here: damaged folders and refused rules.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from fsdptrain.core.errors import UserError
from tests.helpers import FAMILIES, make_model_dir, torchrun

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
    from fsdptrain.config.schema import load_config
    from fsdptrain.dist import distributed
    from fsdptrain.model import models
    from fsdptrain.train.build import build_sharded_model

    cfg = load_config(write_config(tmp_path / "cfg.yaml", folder))
    info = distributed.init("cpu")
    try:
        hf = models.load_hf_config(cfg.model.path, None, None, False)
        model = build_sharded_model(cfg, info, hf).model
        return {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    finally:
        distributed.shutdown(info)


BASE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": False}

# MoE training cases (docs/moe.md) share this launch: one step of training (expert-load counts, aux loss) and the
# real shard sizes of two MoE models for the estimator's model-state terms (3 and 5 experts: uneven over 2 ranks).
STATE = {"mixtral": {"model_type": "mixtral", **BASE, "hidden_size": 56, "num_local_experts": 3,
                     "num_experts_per_tok": 2, "vocab_size": 101},
         "qwen3_moe": {"model_type": "qwen3_moe", **BASE, "num_experts": 5, "num_experts_per_tok": 2,
                       "moe_intermediate_size": 24, "decoder_sparse_step": 1, "mlp_only_layers": [],
                       "vocab_size": 101}}


def routing_examples() -> list[list[list[int]]]:
    """Rows of different lengths (padded micro-batches) with a masked prompt; 2 ranks x 2 micro-batches x 2 rows."""
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(8):
        ids = torch.randint(3, 90, (7 + 2 * i,), generator=g).tolist()
        out.append([ids, [-100] * 3 + ids[3:]])
    return out


@pytest.fixture(scope="module")
def two_ranks(folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe2")
    routing = {"output_dir": str(root / "run"), "seed": 0, "model": {"path": str(folders["mixtral"])},
               "data": {"shuffle": False, "max_length": 64},
               "train": {"max_steps": 1, "micro_batch_size": 2, "grad_accum_steps": 2},
               "parallel": {"device": "cpu", "precision": "fp32", "activation_checkpointing": "full"},
               "logging": {"log_every": 1, "tensorboard": False, "progress": "none"}}
    (root / "routing.yaml").write_text(yaml.safe_dump(routing))
    spec = {"routing": {"config": str(root / "routing.yaml"), "examples": routing_examples(),
                        "out": str(root / "routing.json")}, "model_state": []}
    for name, arch in STATE.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump({"seed": 1, "model": {"hf_config": arch},
                                                           "parallel": {"device": "cpu", "precision": "fp32"}}))
        spec["model_state"].append({"config": str(root / f"{name}.yaml"), "out": str(root / f"state-{name}")})
    (root / "spec.json").write_text(json.dumps(spec))
    r = torchrun(2, ["-m", "tests.workers.moe_load", str(root / "spec.json")], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return root, r


def test_expert_load_counts_equal_transformers_router_on_two_ranks(folders, two_ranks):
    """The tokens each expert got in step 1 (2 ranks x 2 micro-batches, checkpointed blocks recomputed in backward)
    equal the top-k of transformers' own router logits on the same batches; aux_loss is the mean of transformers'
    per-micro-batch aux_loss; `loss` stays the pure cross-entropy."""
    from fsdptrain.model import moe
    from tests.helpers import read_metrics

    root, _ = two_ranks
    got = json.loads((root / "routing.json").read_text())
    ref = hf_model(folders["mixtral"])
    k, n_exp = ref.config.num_experts_per_tok, ref.config.num_local_experts
    expected = torch.zeros(ref.config.num_hidden_layers, n_exp, dtype=torch.int64)
    aux = []
    with torch.no_grad():
        for rank_batches in got["batches"]:
            for ids in rank_batches:
                out = ref(input_ids=torch.tensor(ids), output_router_logits=True)
                aux.append(out.aux_loss.item())
                for layer, logits in enumerate(out.router_logits):
                    top = torch.topk(torch.softmax(logits, dim=-1), k, dim=-1).indices
                    expected[layer] += torch.bincount(top.flatten(), minlength=n_exp)
    assert len(aux) == 4
    assert got["counts"] == expected.tolist()
    assert int(expected.sum()) == k * ref.config.num_hidden_layers * sum(len(r) * len(r[0]) for b in got["batches"]
                                                                         for r in b)
    step1 = read_metrics(root / "run")[0]
    assert {k2: step1[k2] for k2 in moe.summarize(expected)} == moe.summarize(expected)
    assert abs(step1["aux_loss"] - sum(aux) / len(aux)) < 1e-6


@pytest.mark.parametrize("name", list(STATE))
def test_estimator_model_state_equals_real_moe_shards(two_ranks, name):
    from fsdptrain.config.schema import load_config
    from fsdptrain.memory import estimate

    root, _ = two_ranks
    shape = estimate.shape_from_config(load_config(str(root / f"{name}.yaml")))
    assert shape.moe is not None and shape.moe.experts == STATE[name].get("num_local_experts",
                                                                         STATE[name].get("num_experts"))
    for rank in range(2):
        m = json.loads((root / f"state-{name}" / f"rank{rank}.json").read_text())
        est = estimate.model_state(shape, m["world"], m["rank"], 4)
        assert est.local_numel == m["params_local"] == m["grads_local"]
        assert (est.params, est.grads, est.optimizer) == (m["params_storage"], m["grads_storage"],
                                                          m["optimizer_bytes"])
        assert est.n_tensors == m["n_tensors"]


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

    from fsdptrain.model import weightmap

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
