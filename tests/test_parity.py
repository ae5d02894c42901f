"""2-rank FSDP2 training equals a single-process plain-PyTorch reference (fp32, CPU, gloo).

One torchrun launch runs every case (tests/dist_cases.py); the reference loop
below is written independently of fsdptrain's trainer: per-example forward,
loss summed over the global batch's target tokens and divided by their count,
AdamW with no decay on 1-D params, warmup + cosine schedule, norm clipping.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from fsdptrain.data.loader import StepSampler
from fsdptrain.data.synthetic import generate
from fsdptrain.data.tokenize import IGNORE, tokenize_all
from helpers import LLAMA, QWEN2, REPO, make_model_dir, read_metrics, torchrun
from parity_data import uneven_examples

STEPS = 6
HYPER = dict(lr=5e-3, warmup=2, min_ratio=0.1, wd=0.1, clip=0.5, betas=(0.9, 0.95), eps=1e-8)


def base_config(out: Path, model_dir: Path, **sections) -> dict:
    cfg = {
        "output_dir": str(out), "seed": 7,
        "model": {"path": str(model_dir)},
        "data": {"synthetic_task": "add", "synthetic_examples": 64, "max_length": 64},
        "train": {"max_steps": STEPS, "micro_batch_size": 2, "grad_accum_steps": 1, "lr": HYPER["lr"],
                  "warmup_steps": HYPER["warmup"], "schedule": "cosine", "min_lr_ratio": HYPER["min_ratio"],
                  "weight_decay": HYPER["wd"], "max_grad_norm": HYPER["clip"], "adam_betas": list(HYPER["betas"])},
        "parallel": {"device": "cpu", "precision": "fp32"},
        "logging": {"log_every": 1, "tensorboard": False, "progress": "none"},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def reference_run(model_dir: Path, examples, batches: list[list[int]]):
    """Plain single-process loop over the given global batches; returns (losses, model)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    plain = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": HYPER["wd"]}, {"params": plain, "weight_decay": 0.0}],
                            lr=HYPER["lr"], betas=HYPER["betas"], eps=HYPER["eps"])

    def factor(s: int) -> float:
        if s < HYPER["warmup"]:
            return (s + 1) / HYPER["warmup"]
        prog = (s - HYPER["warmup"]) / (STEPS - HYPER["warmup"])
        return HYPER["min_ratio"] + (1 - HYPER["min_ratio"]) * 0.5 * (1 + math.cos(math.pi * prog))

    losses = []
    for s, idx in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = HYPER["lr"] * factor(s)
        total, count = 0.0, 0
        sums = []
        for i in idx:
            ids = torch.tensor([examples[i].input_ids])
            target = torch.tensor([examples[i].labels[1:] + [IGNORE]])
            logits = model(input_ids=ids).logits
            sums.append(F.cross_entropy(logits[0], target[0], ignore_index=IGNORE, reduction="sum"))
            count += int((target != IGNORE).sum())
        loss = torch.stack(sums).sum() / count
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), HYPER["clip"])
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    llama = make_model_dir(root / "llama", LLAMA, seed=1)
    qwen = make_model_dir(root / "qwen2", QWEN2, seed=2)
    cases = {
        "base": base_config(root / "base", llama, checkpoint={"export_hf": True}),
        "accum": base_config(root / "accum", llama, train={"micro_batch_size": 1, "grad_accum_steps": 2}),
        "ac": base_config(root / "ac", llama, parallel={"activation_checkpointing": "full"}),
        "uneven": base_config(root / "uneven", llama, data={"shuffle": False}),
        "qwen2": base_config(root / "qwen2_run", qwen, parallel={"activation_checkpointing": "every_k",
                                                                  "activation_checkpointing_k": 2}),
    }
    spec = {"cases": [], "init_out": str(root / "init2.safetensors"), "init_model_yaml": str(root / "init.yaml")}
    (root / "init.yaml").write_text(yaml.safe_dump({"seed": 3, "model": {"hf_config": {**LLAMA, "vocab_size": 100}},
                                                     "parallel": {"device": "cpu", "precision": "fp32"}}))
    for name, cfg in cases.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        spec["cases"].append({"name": name, "config": str(path), "examples": "uneven" if name == "uneven" else None})
    (root / "spec.json").write_text(json.dumps(spec))
    proc = torchrun(2, [str(REPO / "tests" / "dist_cases.py"), str(root / "spec.json")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, cases, llama, qwen


def synthetic_examples(model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    examples, _ = tokenize_all(tok, generate("add", 64, 7), 64)
    return examples


def global_batches(n: int, shuffle: bool = True) -> list[list[int]]:
    sampler = StepSampler(n, world_size=1, rank=0, micro_batch_size=4, grad_accum_steps=1, seed=7, shuffle=shuffle)
    return [sampler.global_indices(s) for s in range(STEPS)]


def fsdp_losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir)]


@pytest.mark.parametrize("case", ["base", "accum", "ac"])
def test_two_rank_llama_matches_single_process_reference(runs, case):
    root, _, llama, _ = runs
    examples = synthetic_examples(llama)
    ref, _ = reference_run(llama, examples, global_batches(len(examples)))
    got = fsdp_losses(root / case)
    assert len(got) == STEPS
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-5, (got, ref)
    assert ref[-1] < ref[0]  # the run actually learns something, so equality is not trivial


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

    from fsdptrain import distributed, models
    from fsdptrain.config import load_config
    from fsdptrain.parallelize import apply_fsdp

    root = runs[0]
    two = load_file(str(root / "init2.safetensors"))
    cfg = load_config(str(root / "init.yaml"))
    info = distributed.init("cpu")
    try:
        hf = models.load_hf_config(None, cfg.model.hf_config, None, False)
        model = models.build_meta_model(hf, "sdpa", torch.float32, False)
        apply_fsdp(model, models.find_blocks(model), distributed.build_mesh(info), cfg.parallel, "cpu")
        models.materialize(model, info.device, cfg.seed, None)
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
