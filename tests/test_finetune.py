"""LoRA and freeze fine-tuning under FSDP2 (fp32 and bf16-mixed, CPU, gloo).

One 2-rank torchrun launch runs every training case (tests/workers/lora_cases.py). The oracles: `peft`'s LoRA on
the same base in one plain process (tests/reference.py's loop), its lora_A set to the values fsdptrain initialised
(finetune.adapter_init, the same seeded function; lora_B starts at zero in both), and for freeze the same loop on
a transformers model whose frozen parameters are chosen here, independently of fsdptrain.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import LLAMA, make_model_dir, read_metrics, run_cli, torchrun
from tests.reference import STEPS, base_config, global_batches, synthetic_examples, train_reference

LORA = {"rank": 8, "alpha": 16, "target": "all"}
SAME_LOSSES = ["lora_hybrid", "lora_offload", "lora_compiled"]
STEPS_SAME = 3  # two updates: step 3's loss and grad norm follow both, and AdamW's state from the first


def lora_cfg(root: Path, name: str, model: Path, lora: dict, **sections) -> dict:
    return base_config(root / name, model, finetune={"method": "lora", "lora": lora}, **sections)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    llama = make_model_dir(root / "llama", LLAMA, seed=1)
    keep = {"save_every": 3, "keep_last": 0}
    cases = {
        "lora": lora_cfg(root, "lora", llama, LORA, checkpoint=keep),
        "lora_accum_rslora": lora_cfg(root, "lora_accum_rslora", llama,
                                      {"rank": 4, "alpha": 8, "target": "q_proj,v_proj,down_proj", "use_rslora": True},
                                      train={"micro_batch_size": 1, "grad_accum_steps": 2},
                                      parallel={"sync_grads_every_micro_step": False}),
        "lora_ac_chunked": lora_cfg(root, "lora_ac_chunked", llama, LORA, train={"loss_chunk_tokens": 24},
                                    parallel={"activation_checkpointing": "full"}),
        "freeze": base_config(root / "freeze", llama, finetune={"method": "freeze", "freeze": {
            "trainable_layers": 1, "trainable_modules": "mlp", "extra_modules": ["norm"]}}),
        # resumes the lora run's step-3 checkpoint: steps 4-6 must be bitwise those of the uninterrupted run
        "lora_resumed": lora_cfg(root, "lora_resumed", llama, LORA, checkpoint={
            "resume": str(root / "lora" / "checkpoints" / "step-00000003")}),
        # the same checkpoint into adapters of another rank: refused in one line
        "refuse_rank": lora_cfg(root, "refuse_rank", llama, {**LORA, "rank": 4}, checkpoint={
            "resume": str(root / "lora" / "checkpoints" / "step-00000003")}),
        # the lora run with one more option, its first STEPS_SAME steps only (same schedule): hybrid sharding as 2
        # replicas of 1 (adapter gradients all-reduced across replicas), AdamW offloaded to the host, compiled blocks
        "lora_hybrid": lora_cfg(root, "lora_hybrid", llama, LORA, parallel={"sharding": "hybrid",
                                                                            "shard_group_size": 1}),
        "lora_offload": lora_cfg(root, "lora_offload", llama, LORA, parallel={"optimizer_offload": True}),
        "lora_compiled": lora_cfg(root, "lora_compiled", llama, LORA, parallel={"compile": True,
                                                                                "compile_backend": "eager"}),
        "probe": lora_cfg(root, "probe", llama, {"rank": 4, "target": "q_proj,v_proj"}),
        "probe_bf16": lora_cfg(root, "probe_bf16", llama, {"rank": 4, "target": "all"},
                               parallel={"precision": "bf16-mixed"}),
        "probe_freeze_bf16": base_config(root / "probe_freeze_bf16", llama, parallel={"precision": "bf16-mixed"},
                                         finetune={"method": "freeze", "freeze": {"trainable_layers": -1}}),
    }
    ids = synthetic_examples(llama)[0].input_ids
    spec = {"cases": [], "ids": ids}
    for name, cfg in cases.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        case = {"config": str(path), "kind": name.split("_")[0] if name.startswith(("probe", "refuse")) else "train",
                "error_out": str(root / f"{name}.error")}
        if name == "lora":
            case["logits_out"] = str(root / "lora_logits.safetensors")
        if name in SAME_LOSSES:
            case.update(kind="steps", steps=STEPS_SAME, out=str(root / f"{name}.json"))
        spec["cases"].append(case)
    (root / "spec.json").write_text(json.dumps(spec))
    proc = torchrun(2, ["-m", "tests.workers.lora_cases", str(root / "spec.json")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    (root / "stdout.txt").write_text(proc.stdout)
    return root, cases, llama


def peft_model(llama: Path, lora: dict, seed: int):
    """peft's LoRA on the base, lora_A copied from fsdptrain's seeded init (lora_B is zero in both)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(llama), dtype=torch.float32)
    target = lora["target"]
    pcfg = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                      use_rslora=lora.get("use_rslora", False),
                      target_modules="all-linear" if target == "all" else target.split(","))
    model = get_peft_model(base, pcfg)
    assert copy_adapter_init(model, seed) > 0
    return model


def copy_adapter_init(model, seed: int) -> int:
    """Copy fsdptrain's seeded lora_A init into a peft model's adapters (lora_B is zero in both); returns how many
    adapters there are (test_reward.py uses it too)."""
    from fsdptrain.model.finetune import adapter_init

    n = 0
    with torch.no_grad():
        for name, mod in model.named_modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                a = mod.lora_A["default"].weight
                a.copy_(adapter_init(seed, name.removeprefix("base_model.model."), tuple(a.shape)))
                assert not mod.lora_B["default"].weight.any()
                n += 1
    return n


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir)]


_REFERENCES: dict[str, list[float]] = {}


def peft_losses(llama: Path, lora: dict, seed: int) -> list[float]:
    key = json.dumps(lora, sort_keys=True)
    if key not in _REFERENCES:
        examples = synthetic_examples(llama)
        _REFERENCES[key] = train_reference(peft_model(llama, lora, seed), examples, global_batches(len(examples)))
    return _REFERENCES[key]


# lora: all linear layers; accum: 2 micro-batches without sync on the first, rsLoRA scaling, three targets;
# ac_chunked: full activation checkpointing and the chunked, fused lm_head + loss
@pytest.mark.parametrize("case", ["lora", "lora_accum_rslora", "lora_ac_chunked"])
def test_two_rank_lora_matches_peft(runs, case):
    root, cases, llama = runs
    ref = peft_losses(llama, cases[case]["finetune"]["lora"], cases[case]["seed"])
    got = losses(root / case)
    assert len(got) == STEPS
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-5, (got, ref)
    assert ref[-1] < ref[0]  # the adapters learn: equality is not the base model's loss six times


def steps_run(path: Path) -> dict[str, list]:
    return json.loads(path.read_text())


@pytest.mark.parametrize("case", SAME_LOSSES)
def test_lora_losses_stay_the_same_with_hybrid_sharding_optimizer_offload_and_compile(runs, case):
    root = runs[0]
    want = read_metrics(root / "lora")[:STEPS_SAME]  # the plain 2-rank run, itself equal to peft's (above)
    got = steps_run(root / f"{case}.json")
    ran = {"lora_hybrid": ("AdamW", [2, 1], False), "lora_offload": ("CPUOffloadAdamW", [2], False),
           "lora_compiled": ("AdamW", [2], True)}[case]
    assert (got["optimizer"], got["mesh"], all(got["compiled"])) == ran
    assert got["step"] == [1, 2, 3]
    for key in ("loss", "grad_norm"):
        diff = max(abs(a - m[key]) for a, m in zip(got[key], want))
        assert diff < 1e-5, (key, got[key], [m[key] for m in want])
    assert got["loss"][2] < got["loss"][0]


def test_freeze_matches_a_reference_freezing_the_same_parameters(runs):
    from transformers import AutoModelForCausalLM

    root, _, llama = runs
    model = AutoModelForCausalLM.from_pretrained(str(llama), dtype=torch.float32)
    last = model.config.num_hidden_layers - 1
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(f"model.layers.{last}.mlp.") or name == "model.norm.weight")
    assert sum(p.requires_grad for p in model.parameters()) == 4
    examples = synthetic_examples(llama)
    ref = train_reference(model, examples, global_batches(len(examples)))
    got = losses(root / "freeze")
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-5, (got, ref)
    assert ref[-1] < ref[0]


def probe(root: Path, name: str) -> dict:
    return json.loads((root / name / "PROBE.json").read_text())


def test_only_trainable_parameters_get_gradients_and_optimizer_state(runs):
    root = runs[0]
    p = probe(root, "probe")
    # q_proj: 64 -> 64, v_proj: 64 -> 32 (2 kv heads x 16), rank 4, 3 blocks
    n = 3 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)
    assert p["n_trainable"] == n and len(p["trainable"]) == 12
    assert all(".lora_A." in t or ".lora_B." in t for t in p["trainable"])
    assert p["frozen_with_grad"] == [] and p["trainable_without_grad"] == []
    assert p["optimizer_state_elements"] == 2 * n  # summed over both ranks' shards
    assert p["optimizer_params"] == 12


def test_bf16_mixed_stores_the_frozen_base_in_bf16_and_trainable_weights_in_fp32(runs):
    from fsdptrain.data.tokenizer import build_char_tokenizer

    root = runs[0]
    vocab, h, i, kv = len(build_char_tokenizer()), 64, 128, 32
    block = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # attention, mlp, two norms
    base = vocab * h + 3 * block + h  # tied embeddings once, final norm
    p = probe(root, "probe_bf16")
    # all-linear rank 4: q, k, v, o, gate, up, down per block
    adapters = 3 * 4 * ((h + h) + (h + kv) * 2 + (h + h) + (h + i) * 2 + (i + h))
    assert p["n_trainable"] == adapters
    assert p == {**p, "frozen.bfloat16": 2 * base, "trainable.float32": 4 * adapters}
    assert "frozen.float32" not in p and "trainable.bfloat16" not in p
    assert p["optimizer_state_elements"] == 2 * adapters
    assert p["frozen_with_grad"] == [] and p["trainable_without_grad"] == []
    f = probe(root, "probe_freeze_bf16")  # freeze the first block only trains: fp32 masters for it alone
    assert f["trainable.float32"] == 4 * block and f["frozen.bfloat16"] == 2 * (base - block)
    assert f["optimizer_state_elements"] == 2 * block


@pytest.mark.parametrize("case", ["probe", "probe_bf16", "probe_freeze_bf16"])
def test_estimated_model_state_equals_the_real_shards(runs, case):
    from fsdptrain.config.schema import load_config
    from fsdptrain.memory import estimate

    root = runs[0]
    cfg = load_config(str(root / f"{case}.yaml"))
    shape = estimate.shape_from_config(cfg)
    settings = estimate.settings_from_config(cfg, 1, 2, 1, device_type="cpu")
    est = estimate.compute(shape, settings.vary(parallel={"activation_checkpointing": "none"}), rank=0)
    for rank in range(2):
        real = json.loads((root / case / f"PROBE-rank{rank}.json").read_text())
        st = estimate.model_state(shape, 2, rank, 4, frozen_bytes=2 if "bf16" in case else 4)
        assert (st.params, st.grads, st.optimizer, st.n_tensors) == (
            real["params_storage"], real["grads_storage"], real["optimizer_bytes"], real["n_tensors"]), rank
    assert est.state == estimate.model_state(shape, 2, 0, 4, frozen_bytes=2 if "bf16" in case else 4)


def test_lora_checkpoint_holds_only_the_adapters_and_resumes_bitwise(runs):
    from torch.distributed.checkpoint import FileSystemReader

    root = runs[0]
    step = root / "lora" / "checkpoints" / "step-00000003"
    meta = FileSystemReader(str(step)).read_metadata().state_dict_metadata
    weights = [k for k in meta if k.startswith("model.")]
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights), weights[:5]
    assert len(weights) == 3 * 7 * 2
    state = json.loads((step / "train_state.json").read_text())
    assert state["finetune"]["method"] == "lora" and state["finetune"]["rank"] == 8
    full = read_metrics(root / "lora")
    resumed = read_metrics(root / "lora_resumed")
    assert [m["step"] for m in resumed] == [4, 5, 6]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in full[3:]]  # bitwise
    assert [m["grad_norm"] for m in resumed] == [m["grad_norm"] for m in full[3:]]


def test_lora_checkpoint_resumes_on_one_rank(runs):
    from fsdptrain.config.schema import load_config
    from fsdptrain.trainer import train

    root, cases, _ = runs
    step = root / "lora" / "checkpoints" / "step-00000003"
    cfg = {**cases["lora"], "output_dir": str(root / "one_rank"), "checkpoint": {"resume": str(step)},
           "train": {**cases["lora"]["train"], "micro_batch_size": 4}}  # the same global batch on one rank
    (root / "one_rank.yaml").write_text(yaml.safe_dump(cfg))
    train(load_config(str(root / "one_rank.yaml")))  # in this process: a world of one
    got = [m["loss"] for m in read_metrics(root / "one_rank")]
    want = losses(root / "lora")[3:]
    assert len(got) == 3 and max(abs(a - b) for a, b in zip(got, want)) < 1e-5, (got, want)


@pytest.mark.slow
def test_lora_checkpoint_resumes_on_four_ranks(runs):
    """The 2-rank step-3 checkpoint resharded onto 4 ranks (micro-batch 1: the same global batch of 4): steps 4 and
    5 equal the uninterrupted 2-rank run's. Step 5 follows an update made with the resharded AdamW state."""
    root, cases, _ = runs
    cfg = {**cases["lora"], "output_dir": str(root / "four_ranks"),
           "checkpoint": {"resume": str(root / "lora" / "checkpoints" / "step-00000003")},
           "train": {**cases["lora"]["train"], "micro_batch_size": 1}}
    (root / "four_ranks.yaml").write_text(yaml.safe_dump(cfg))
    spec = {"cases": [{"config": str(root / "four_ranks.yaml"), "kind": "steps", "steps": 2,
                       "out": str(root / "four_ranks.json")}]}
    (root / "four_ranks_spec.json").write_text(json.dumps(spec))
    proc = torchrun(4, ["-m", "tests.workers.lora_cases", str(root / "four_ranks_spec.json")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = steps_run(root / "four_ranks.json")
    want = read_metrics(root / "lora")[3:5]
    assert got["step"] == [4, 5] and got["mesh"] == [4]
    for key in ("loss", "grad_norm"):
        diff = max(abs(a - m[key]) for a, m in zip(got[key], want))
        assert diff < 1e-5, (key, got[key], [m[key] for m in want])


def test_lora_checkpoint_into_other_adapters_is_refused_in_one_line(runs):
    root = runs[0]
    msg = (root / "refuse_rank.error").read_text()
    assert msg == (f"{root / 'lora' / 'checkpoints' / 'step-00000003' / 'train_state.json'}: finetune settings differ "
                   "(rank 8 in the checkpoint, 4 now); resume with the "
                   "checkpoint's finetune settings (checkpoint.resume=none starts fresh)"), msg


def test_export_writes_a_peft_adapter_and_a_merged_model_with_the_trained_logits(runs):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from fsdptrain.run.export import export_checkpoint

    root, _, llama = runs
    trained = load_file(str(root / "lora_logits.safetensors"))["logits"]  # the 2-rank model after 6 steps
    ids = torch.tensor([synthetic_examples(llama)[0].input_ids])
    proc = run_cli(["export", str(root / "lora"), "--out", str(root / "adapter")])  # the command, once
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {f.name for f in (root / "adapter").iterdir()}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(llama), dtype=torch.float32),
                                      str(root / "adapter"))
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert (got - trained).abs().max() < 1e-5, (got - trained).abs().max()

    export_checkpoint(str(root / "lora"), str(root / "merged"), merge=True)
    merged = AutoModelForCausalLM.from_pretrained(str(root / "merged"), dtype=torch.float32)
    with torch.no_grad():
        got = merged(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(str(llama), dtype=torch.float32)(input_ids=ids).logits
    # W + s·BA in one matrix rounds differently from x·W + s·(x·A)·B: on logits up to ~70 that is ~1e-5 apart,
    # machine-dependent (1.14e-5 max on an AMD EPYC); a wrong merge (scale, transpose, a missed module) is >1e-2
    torch.testing.assert_close(got, trained, rtol=1e-5, atol=1e-5)
    assert (base - trained).abs().max() > 1e-2  # the adapters changed the model


def meta_llama():
    from fsdptrain.model import models

    hf = models.load_hf_config(None, {**LLAMA, "vocab_size": 100}, None, False)
    model = models.build_meta_model(hf, "sdpa", torch.float32, False)
    return model, models.find_blocks(model)


@pytest.mark.parametrize("section, error", [
    ({"method": "lora", "lora": {"target": "q_proj,qkv_proj"}},
     "finetune.lora.target: 'qkv_proj' matches no linear layer of the model's blocks; its linear layers are: "
     "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj (or all)"),
    ({"method": "freeze", "freeze": {"trainable_layers": 4}},
     "finetune.freeze.trainable_layers: 4 but the model has 3 blocks; give a value from -3 to 3"),
    ({"method": "freeze", "freeze": {"trainable_modules": "attn"}},
     "finetune.freeze.trainable_modules: 'attn' matches nothing in block model.layers.1; its modules are: "
     "act_fn, down_proj, gate_proj, input_layernorm, k_proj, mlp, o_proj, post_attention_layernorm, q_proj, self_attn, "
     "up_proj, v_proj (or all)"),
])
def test_bad_targets_are_one_line(section, error):
    from fsdptrain.config.schema import FinetuneConfig, FreezeConfig, LoraConfig
    from fsdptrain.core.errors import ConfigError
    from fsdptrain.model.finetune import prepare

    fcfg = FinetuneConfig(section["method"], LoraConfig(**section.get("lora", {})),
                          FreezeConfig(**section.get("freeze", {})))
    model, blocks = meta_llama()
    with pytest.raises(ConfigError) as e:
        prepare(model, blocks, fcfg, "fp32")
    assert str(e.value) == error


@pytest.mark.parametrize("overrides, error", [
    (["finetune.method=lora", "finetune.lora.rank=0"], "finetune.lora.rank: 0 must be a positive integer (e.g. 8 "
                                                       "or 16)"),
    (["finetune.method=lora", "finetune.lora.rank=-4"], "finetune.lora.rank: -4 must be a positive integer"),
    (["finetune.lora.rank=16"], "finetune.lora.* is set but finetune.method is full; set finetune.method=lora, or "
                                "remove the finetune.lora settings"),
    (["finetune.method=full", "finetune.freeze.trainable_layers=1"], "finetune.freeze.* is set but finetune.method "
                                                                     "is full"),
    (["lora_target=all"], "unknown key 'lora_target'; did you mean 'finetune.lora.target'?"),
])
def test_bad_finetune_settings_are_one_line(overrides, error):
    from fsdptrain.config.schema import load_config
    from fsdptrain.core.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert error in str(e.value) and "\n" not in str(e.value)


def test_lora_layers_keep_hugging_face_names_and_get_adapters_in_their_block():
    from fsdptrain.config.schema import FinetuneConfig, LoraConfig
    from fsdptrain.model.finetune import LoRALinear, prepare

    model, blocks = meta_llama()
    plan = prepare(model, blocks, FinetuneConfig("lora", LoraConfig(rank=4, target=["q_proj", "down_proj"])),
                   "bf16-mixed")
    assert plan.lora_modules == [f"model.layers.{i}.{m}" for i in range(3) for m in ("self_attn.q_proj",
                                                                                      "mlp.down_proj")]
    q = blocks[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and q.lora_A.weight.shape == (4, 64) and q.lora_B.weight.shape == (64, 4)
    assert q.weight.dtype == torch.bfloat16 and not q.weight.requires_grad
    assert q.lora_A.weight.dtype == torch.float32 and q.lora_A.weight.requires_grad
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tying survives the bf16 copy


def test_modules_to_save_export_round_trip_on_one_rank(tmp_path):
    """An untied model: lora on q_proj plus lm_head trained in full; the PEFT adapter (PEFT applies it) and the
    merged folder (fsdptrain merges) give the same logits, which differ from the base's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fsdptrain.config.schema import load_config
    from fsdptrain.run.export import export_checkpoint
    from fsdptrain.trainer import train
    from tests.helpers import QWEN2

    qwen = make_model_dir(tmp_path / "qwen2", {**QWEN2, "num_hidden_layers": 1}, seed=2)
    cfg = base_config(tmp_path / "run", qwen, finetune={"method": "lora", "lora": {
        "rank": 4, "target": "q_proj", "modules_to_save": ["lm_head"]}}, train={"max_steps": 2})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    train(load_config(str(tmp_path / "c.yaml")))
    export_checkpoint(str(tmp_path / "run"), str(tmp_path / "adapter"))
    export_checkpoint(str(tmp_path / "run"), str(tmp_path / "merged"), merge=True)
    ids = torch.tensor([synthetic_examples(qwen)[0].input_ids])
    base = AutoModelForCausalLM.from_pretrained(str(qwen), dtype=torch.float32)
    with torch.no_grad():
        before = base(input_ids=ids).logits
        peft = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)(
            input_ids=ids).logits
    assert (peft - merged).abs().max() < 1e-5, (peft - merged).abs().max()
    assert (peft - before).abs().max() > 1e-3
