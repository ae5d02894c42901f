"""Hybrid sharding (parallel.sharding: hybrid): 4 CPU ranks as 2 x 2 equal the single-process reference.

One torchrun launch (tests/workers/hybrid_cases.py) trains every case and dumps each
rank's local shards; the reference loop is tests/reference.py. The pure mesh
arithmetic is tested without processes.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from fsdptrain.config.schema import load_config
from fsdptrain.core.errors import ConfigError, LaunchError
from fsdptrain.dist.mesh import check_node_layout, hybrid_shape
from tests.helpers import LLAMA, make_model_dir, read_metrics, torchrun
from tests.parity_data import uneven_examples
from tests.reference import STEPS, base_config, global_batches, reference_run, synthetic_examples

HYBRID = {"sharding": "hybrid", "shard_group_size": 2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid")
    llama = make_model_dir(root / "llama", LLAMA, seed=1)
    # 4 ranks x micro-batch 1 = the reference's global batch of 4 examples
    cases = {
        "hybrid": base_config(root / "hybrid", llama, train={"micro_batch_size": 1}, parallel=HYBRID,
                              checkpoint={"export_hf": True}),
        "uneven": base_config(root / "uneven", llama, train={"micro_batch_size": 1}, parallel=HYBRID,
                              data={"shuffle": False}),
    }
    spec = {"cases": [], "layout_yaml": str(root / "hybrid.yaml"), "layout_dir": str(root)}
    for name, cfg in cases.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        spec["cases"].append({"config": str(path), "examples": "uneven" if name == "uneven" else None})
    (root / "spec.json").write_text(json.dumps(spec))
    proc = torchrun(4, ["-m", "tests.workers.hybrid_cases", str(root / "spec.json")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, llama, proc.stdout


@pytest.fixture(scope="module")
def reference(runs):
    """The single-process reference on the synthetic data: (losses, trained model)."""
    llama = runs[1]
    examples = synthetic_examples(llama)
    return reference_run(llama, examples, global_batches(len(examples)))


@pytest.mark.slow  # a 4-rank launch
def test_hybrid_2x2_matches_single_process_reference(runs, reference):
    root, llama, stdout = runs
    ref, _ = reference
    got = [m["loss"] for m in read_metrics(root / "hybrid")]
    assert len(got) == STEPS
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-5, (got, ref)
    assert ref[-1] < ref[0]
    assert "mesh replicate 2 x shard 2" in stdout


@pytest.mark.slow  # a 4-rank launch
def test_hybrid_normalises_tokens_across_replicas(runs):
    # ranks 0-1 (first replica) hold ~40x the target tokens of ranks 2-3 in every step
    root, llama, _ = runs
    examples = uneven_examples()
    ref, _ = reference_run(llama, examples, global_batches(len(examples), shuffle=False))
    got = [m["loss"] for m in read_metrics(root / "uneven")]
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-5, (got, ref)


@pytest.mark.slow  # a 4-rank launch
def test_hybrid_export_has_the_reference_weights(runs, reference):
    from transformers import AutoModelForCausalLM

    root = runs[0]
    ref_model = reference[1]
    exported = AutoModelForCausalLM.from_pretrained(str(root / "hybrid" / "hf"), dtype=torch.float32)
    for (name, a), b in zip(exported.state_dict().items(), ref_model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name


@pytest.mark.slow  # a 4-rank launch
def test_hybrid_layout_shards_within_a_group_and_replicates_across(runs):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    root, llama, _ = runs
    local = [load_file(str(root / f"rank{r}.safetensors")) for r in range(4)]
    meta = [json.loads((root / f"rank{r}.json").read_text()) for r in range(4)]
    assert meta[0]["mesh_shape"] == [2, 2] and meta[0]["mesh_dims"] == ["replicate", "shard"]
    assert meta[0]["placements"] == ["R", "S(0)"]  # Replicate() across groups, Shard(0) inside
    assert [m["coordinate"] for m in meta] == [[0, 0], [0, 1], [1, 0], [1, 1]]
    full = AutoModelForCausalLM.from_pretrained(str(llama), dtype=torch.float32).state_dict()
    for name, weight in full.items():
        if name == "lm_head.weight":  # tied to the embedding
            continue
        # ranks 0,1 (and 2,3) together hold the whole tensor once: sharded in the group ...
        assert torch.equal(torch.cat([local[0][name], local[1][name]]), weight), name
        # ... and the second group is a replica of the first
        assert torch.equal(local[2][name], local[0][name]) and torch.equal(local[3][name], local[1][name]), name


def test_hybrid_shape_and_node_layout_checks():
    assert hybrid_shape(16, 8) == (2, 8)
    assert hybrid_shape(4, 4) == (1, 4)
    with pytest.raises(ConfigError, match=r"parallel.shard_group_size: 3 does not divide the world size 4"):
        hybrid_shape(4, 3)
    check_node_layout([0, 0, 1, 1], 2)
    with pytest.raises(LaunchError, match=r"ranks 0\.\.1 span nodes \[0, 1\]"):
        check_node_layout([0, 1, 0, 1], 2)
    with pytest.raises(LaunchError, match="different numbers of processes"):
        check_node_layout([0, 0, 1, 1, 2, 2, 2, 2], 2)


def test_sharding_keys_are_validated():
    assert load_config(None, ["parallel.sharding=hybrid"]).parallel.shard_group_size is None
    with pytest.raises(ConfigError, match="parallel.sharding: 'zero2' is not allowed; choose one of full, hybrid"):
        load_config(None, ["parallel.sharding=zero2"])
    with pytest.raises(ConfigError, match="parallel.shard_group_size: 0 is below the minimum 1"):
        load_config(None, ["parallel.shard_group_size=0"])
