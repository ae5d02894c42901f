"""2-rank FSDP2 training equals a single-process plain-PyTorch reference (fp32, CPU, gloo).

One torchrun launch runs every case (tests/workers/dist_cases.py); the reference loop is
in tests/reference.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import LLAMA, QWEN2, make_model_dir, read_metrics, torchrun
from tests.parity_data import uneven_examples
from tests.reference import STEPS, base_config, global_batches, reference_run, synthetic_examples


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    llama = make_model_dir(root / "llama", LLAMA, seed=1)
    qwen = make_model_dir(root / "qwen2", QWEN2, seed=2)
    cases = {
        "base": base_config(root / "base", llama, checkpoint={"export_hf": True}),
        "accum": base_config(root / "accum", llama, train={"micro_batch_size": 1, "grad_accum_steps": 2},
                             parallel={"sync_grads_every_micro_step": False}),  # no reduction on micro-step 1
        "ac": base_config(root / "ac", llama, parallel={"activation_checkpointing": "full"}),
        "zero2_sync_every_micro_step": base_config(
            root / "zero2_sync_every_micro_step", llama, train={"micro_batch_size": 1, "grad_accum_steps": 2},
            parallel={"reshard_after_forward": False, "sync_grads_every_micro_step": True}),
        "uneven": base_config(root / "uneven", llama, data={"shuffle": False}),
        # performance paths (issue 7) must not change the numbers
        "chunked_loss": base_config(root / "chunked_loss", llama, train={"loss_chunk_tokens": 24},
                                    parallel={"prefetch_blocks": 2}),
        "selective_ac": base_config(root / "selective_ac", llama, parallel={"activation_checkpointing": "selective"}),
        "optimizer_offload": base_config(root / "optimizer_offload", llama, parallel={"optimizer_offload": True}),
        "compiled_ac": base_config(root / "compiled_ac", llama,
                                   parallel={"compile": True, "compile_backend": "aot_eager",
                                             "activation_checkpointing": "full"},
                                   train={"loss_chunk_tokens": 24}),  # the compiled per-chunk loss too
        "qwen2": base_config(root / "qwen2_run", qwen, parallel={"activation_checkpointing": "every_k",
                                                                  "activation_checkpointing_k": 2}),
        "auto_ac": base_config(root / "auto_ac", llama, parallel={
            "activation_checkpointing": "auto", "memory_budget_gib": auto_budget_gib(root, llama)}),
        # what gpu_check.sh's auto variant runs: compiled blocks, some fully and some selectively checkpointed
        "compiled_auto_chunked": base_config(root / "compiled_auto_chunked", llama, parallel={
            "activation_checkpointing": "auto", "memory_budget_gib": auto_budget_gib(root, llama),
            "compile": True, "compile_backend": "aot_eager"}, train={"loss_chunk_tokens": 24}),
    }
    spec = {"cases": [], "init_out": str(root / "init2.safetensors"), "init_model_yaml": str(root / "init.yaml")}
    (root / "init.yaml").write_text(yaml.safe_dump({"seed": 3, "model": {"hf_config": {**LLAMA, "vocab_size": 100}},
                                                     "parallel": {"device": "cpu", "precision": "fp32"}}))
    for name, cfg in cases.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        spec["cases"].append({"name": name, "config": str(path), "examples": "uneven" if name == "uneven" else None})
    (root / "spec.json").write_text(json.dumps(spec))
    proc = torchrun(2, ["-m", "tests.workers.dist_cases", str(root / "spec.json")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    (root / "stdout.txt").write_text(proc.stdout)
    return root, cases, llama, qwen


AUTO_PLAN = 4  # of candidate_plans(3): block 0 full, blocks 1-2 selective


def auto_budget_gib(root: Path, llama: Path) -> float:
    """A budget between candidate plan AUTO_PLAN's estimated peak and every less-recomputing plan's."""
    from fsdptrain.config.schema import load_config
    from fsdptrain.memory import estimate

    (root / "auto_probe.yaml").write_text(yaml.safe_dump(base_config(root / "probe", llama)))
    cfg = load_config(str(root / "auto_probe.yaml"))
    shape = estimate.shape_from_config(cfg)
    s = estimate.settings_from_config(cfg, 1, 2, 1)
    peaks = [estimate.compute(shape, s.with_plan(p)).peak for p in estimate.candidate_plans(shape.layers)]
    assert min(peaks[:AUTO_PLAN]) > peaks[AUTO_PLAN]
    return (peaks[AUTO_PLAN] + min(peaks[:AUTO_PLAN])) / 2 / 2**30


def fsdp_losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir)]


@pytest.mark.parametrize("case", ["base", "accum", "ac", "zero2_sync_every_micro_step", "chunked_loss", "selective_ac",
                                  "optimizer_offload", "compiled_ac", "auto_ac", "compiled_auto_chunked"])
def test_two_rank_llama_matches_single_process_reference(runs, case):
    root, _, llama, _ = runs
    examples = synthetic_examples(llama)
    ref, _ = reference_run(llama, examples, global_batches(len(examples)))
    got = fsdp_losses(root / case)
    assert len(got) == STEPS
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-5, (got, ref)
    assert ref[-1] < ref[0]  # the run actually learns something, so equality is not trivial


def test_auto_checkpointing_applies_the_planned_mix(runs):
    root = runs[0]
    out = (root / "stdout.txt").read_text()
    # auto_ac and compiled_auto_chunked both get the planned mix
    assert out.count("activation checkpointing auto: blocks 0 full, 1-2 selective; estimated peak") == 2, out[-3000:]
    assert "model: llama, " in out and "checkpointed blocks 3," in out


def test_uneven_target_tokens_per_rank_are_normalised_globally(runs):
    root, _, llama, _ = runs
    examples = uneven_examples()
    batches = global_batches(len(examples), shuffle=False)
    # rank 0 holds ~40x the target tokens of rank 1 in every step
    ref, _ = reference_run(llama, examples, batches)
    got = fsdp_losses(root / "uneven")
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-5, (got, ref)
    metrics = read_metrics(root / "uneven")
    assert metrics[0]["target_tokens"] == sum(examples[i].n_targets for i in batches[0])


def test_qwen2_with_every_k_checkpointing_matches_reference(runs):
    root, _, _, qwen = runs
    examples = synthetic_examples(qwen)
    ref, _ = reference_run(qwen, examples, global_batches(len(examples)))
    got = fsdp_losses(root / "qwen2_run")
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-5, (got, ref)


def test_exported_model_has_the_reference_weights(runs):
    from transformers import AutoModelForCausalLM

    root, _, llama, _ = runs
    examples = synthetic_examples(llama)
    _, ref_model = reference_run(llama, examples, global_batches(len(examples)))
    exported = AutoModelForCausalLM.from_pretrained(str(root / "base" / "hf"), dtype=torch.float32)
    ids = torch.tensor([examples[0].input_ids])
    with torch.no_grad():
        a, b = exported(input_ids=ids).logits, ref_model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()


def test_random_init_does_not_depend_on_world_size(runs):
    from safetensors.torch import load_file

    from fsdptrain.config.schema import load_config
    from fsdptrain.dist import distributed
    from fsdptrain.model import models
    from fsdptrain.train.build import build_sharded_model

    root = runs[0]
    two = load_file(str(root / "init2.safetensors"))
    cfg = load_config(str(root / "init.yaml"))
    info = distributed.init("cpu")
    try:
        hf = models.load_hf_config(None, cfg.model.hf_config, None, False)
        model = build_sharded_model(cfg, info, hf).model
        one = {n: p.full_tensor() for n, p in model.named_parameters()}
        one.update({f"buffer.{n}": b for n, b in model.named_buffers()})
    finally:
        distributed.shutdown(info)
    assert set(one) == set(two)
    for name in one:
        assert torch.equal(one[name], two[name]), name
    # shards of a 2-D weight are not copies of each other, and RoPE inv_freq is the real one
    q = two["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(q[:32], q[32:])
    assert abs(q.std().item() - 0.02) < 0.003
    inv = two["buffer.model.rotary_emb.inv_freq"]
    assert torch.allclose(inv, 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16)))
