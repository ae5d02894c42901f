"""Context parallelism (parallel.context_parallel, Ulysses): the chunking of a micro-batch, the attention's
exchange against whole-sequence attention, training parity with the CP=1 run, and the one-line refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fsdptrain.config.schema import load_config
from fsdptrain.core.errors import ConfigError
from fsdptrain.data.encode import IGNORE, Example
from fsdptrain.data.loader import StepSampler, _StepBatches, collate, context_chunk
from fsdptrain.dist.context import layout
from fsdptrain.model import ulysses
from tests.helpers import FAMILIES, LLAMA, make_model_dir, read_metrics, run_cli, torchrun


def examples(lengths: list[int], seq_lens: bool = False) -> list[Example]:
    out = []
    for n in lengths:
        ids = list(range(1, n + 1))
        out.append(Example(ids, [IGNORE] + ids[1:], seq_lens=[n - 2, 2] if seq_lens else None))
    return out


# ----------------------------------------------------------------------------- the data path


def test_chunks_put_back_together_are_the_collated_rows():
    rows = examples([13, 7])
    full = collate(rows, pad_id=0)
    chunks = [context_chunk(full, [13, 7], 2, i) for i in range(2)]
    assert torch.equal(torch.cat([c["input_ids"] for c in chunks], 1), full["input_ids"])
    assert torch.equal(torch.cat([c["labels"] for c in chunks], 1), full["labels"])
    # labels were shifted before the cut: chunk 0's last label is chunk 1's first token
    assert chunks[0]["labels"][0, -1] == chunks[1]["input_ids"][0, 0] == 9
    assert [int(c["n_tokens"]) for c in chunks] == [8 + 7, 5]  # rows of 13 and 7 real tokens, width 16
    assert sum(int(c["n_tokens"]) for c in chunks) == int(full["n_tokens"])
    for i, c in enumerate(chunks):  # RoPE: each chunk's slice of the full rows' positions
        assert torch.equal(c["position_ids"], torch.arange(8 * i, 8 * i + 8).expand(2, 8))
        assert torch.equal(c["context_position_ids"], torch.arange(16).expand(2, 16))


def test_packed_chunks_keep_the_documents_positions():
    full = collate(examples([12], seq_lens=True), pad_id=0)
    chunk = context_chunk(full, [12], 2, 1)
    assert chunk["position_ids"].tolist() == [[8, 9, 0, 1, 0, 1, 2, 3]]  # docs of 10 and 2, then 4 padding
    assert torch.equal(chunk["context_position_ids"], full["position_ids"])


def test_rows_are_padded_to_a_multiple_of_n_with_ignored_labels():
    sampler = StepSampler(2, 1, 0, 2, 1, seed=0, shuffle=False)
    rows = examples([13, 7])
    cut = [_StepBatches(sampler, rows, 0, 0, 1, False, (3, i))[0][0] for i in range(3)]
    assert [c["input_ids"].shape[1] for c in cut] == [8, 8, 8]  # 16 rounded up to 24 (8 and 3 both divide it)
    assert (cut[2]["labels"] == IGNORE).all() and (cut[2]["input_ids"] == 0).all()
    assert sum(int(c["n_tokens"]) for c in cut) == 20


def test_pairs_and_kto_examples_are_cut_with_their_whole_rows_counted():
    """A chunk may hold none of a row's response: the units (pairs, KTO examples) come from the whole rows'
    target counts the chunk keeps (`row_targets`, host only), and n_tokens from each row's real length."""
    from fsdptrain.data.encode import Feedback, Pair
    from fsdptrain.data.loader import to_device
    from fsdptrain.objectives.kto import examples_in
    from fsdptrain.objectives.preference import pairs_in

    def ex(prompt: int, response: int) -> Example:
        return Example(list(range(1, prompt + response + 1)), [IGNORE] * prompt + [7] * response)

    sampler = StepSampler(2, 1, 0, 2, 1, seed=0, shuffle=False)
    pairs = [Pair(ex(10, 3), ex(10, 5)), Pair(ex(4, 2), ex(4, 1))]
    cut = [_StepBatches(sampler, pairs, 0, 0, 1, False, (2, i))[0][0] for i in range(2)]
    assert [c["input_ids"].shape[1] for c in cut] == [8, 8]  # the longest row, 15, padded to 16
    assert cut[0]["row_targets"].tolist() == cut[1]["row_targets"].tolist() == [3, 2, 5, 1]
    assert (cut[1]["labels"][1] == IGNORE).all()  # the second pair's chosen response lies in chunk 0 only
    assert [pairs_in(c) for c in cut] == [2, 2]  # each rank counts the pairs in full (objectives/base.py)
    assert [int(c["n_tokens"]) for c in cut] == [8 + 6 + 8 + 5, 5 + 0 + 7 + 0]
    assert "row_targets" not in to_device(cut[0], torch.device("cpu"))  # never given to the model
    kto = [Feedback(ex(10, 3), ex(10, 0), True), Feedback(ex(4, 2), ex(4, 2), False)]
    cut = [_StepBatches(sampler, kto, 0, 0, 1, False, (2, i))[0][0] for i in range(2)]
    assert [examples_in(c) for c in cut] == [2, 2] and cut[1]["desirable"].tolist() == [True, False]


def test_a_context_group_reads_the_rows_of_one_data_rank():
    lay = [layout(2, 4, r) for r in range(4)]
    assert [(x.data_world, x.data_rank, x.index) for x in lay] == [(2, 0, 0), (2, 0, 1), (2, 1, 0), (2, 1, 1)]
    assert lay[3].group_ranks == [2, 3]


# ----------------------------------------------------------------------------- the attention


def test_document_mask():
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    mask = ulysses.document_mask(pos)[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert ulysses.document_mask(torch.arange(5)[None]) is None  # no restart: the causal kernel


@pytest.mark.parametrize("ranks", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_ulysses_attention_equals_whole_sequence_attention_in_value_and_gradient(ranks):
    """2 ranks split the 2 key/value heads; 4 ranks repeat them to the 4 query heads first."""
    proc = torchrun(ranks, ["-m", "tests.workers.context_cases"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.findall(rf"^case (\S+) ranks {ranks} out (\S+) grad (\S+)$", proc.stdout, re.M)
    assert [f[0] for f in found] == ["split-kv", "repeat-kv", "packed", "packed-repeat"], proc.stdout
    for name, out, grad in found:
        assert float(out) < 1e-12 and float(grad) < 1e-12, (name, out, grad)


# ----------------------------------------------------------------------------- training parity


def train_run(tmp: Path, name: str, nproc: int, extra: list[str]) -> Path:
    out = tmp / name
    args = ["-m", "fsdptrain", "train", f"output_dir={out}", "train.max_steps=6", "logging.log_every=1",
            "logging.progress=lines", "data.synthetic_examples=200", "data.val_size=0", "train.eval_every=0",
            "train.micro_batch_size=4", "train.grad_accum_steps=2", "checkpoint.export_hf=true", *extra]
    if "finetune.method=lora" in extra:
        args.append("checkpoint.export_hf=false")
    proc = torchrun(nproc, args, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def assert_same_training(one: Path, two: Path) -> None:
    """The same losses, token counts and gradient norms every step, and the same weights at the end."""

    a, b = read_metrics(one), read_metrics(two)
    assert [m["step"] for m in b] == list(range(1, 7))
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"] and x["target_tokens"] == y["target_tokens"]
        # 1e-5, and float32's relative rounding on top for large losses (LoRA's random base starts at 64)
        assert abs(x["loss"] - y["loss"]) < 1e-5 + 1e-7 * abs(x["loss"]), (x["step"], x["loss"], y["loss"])
        assert abs(x["grad_norm"] - y["grad_norm"]) < 1e-4 * max(1.0, x["grad_norm"])
        # evaluation runs whole rows on every rank (no sequence set: model/ulysses.py's plain path)
        assert ("eval_loss" in x) == ("eval_loss" in y)
        assert abs(x.get("eval_loss", 0.0) - y.get("eval_loss", 0.0)) < 1e-5
    if not (one / "hf").exists():  # LoRA: the adapters, exported after training (PEFT layout)
        for run in (one, two):
            proc = run_cli(["export", str(run), "--out", str(run / "hf")])
            assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_exports(one, two)


def assert_same_exports(one: Path, two: Path, atol: float = 1e-5) -> None:
    """The two runs' exported weights (hf/) agree within atol; the CP run's config names no attention of ours."""
    from safetensors.torch import load_file

    if (two / "hf" / "config.json").exists():
        assert "fsdptrain_ulysses" not in (two / "hf" / "config.json").read_text()
    [fa], [fb] = sorted((one / "hf").glob("*.safetensors")), sorted((two / "hf").glob("*.safetensors"))
    wa, wb = load_file(str(fa)), load_file(str(fb))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=atol), (k, (wa[k] - wb[k]).abs().max())


@pytest.mark.slow
def test_checkpoints_resume_across_context_parallel_sizes(tmp_path):
    """A CP=2 run's checkpoint continues with CP=1 and a CP=1 run's with CP=2, each like the uninterrupted run."""
    extra = ["data.packing=true", "data.pack_length=128"]
    ref = read_metrics(train_run(tmp_path, "ref", 1, [*extra, "train.max_steps=9"]))
    for first, then in ((2, 1), (1, 2)):
        name = f"cp{first}-then-cp{then}"
        train_run(tmp_path, name, first, [*extra, f"parallel.context_parallel={first}"])
        out = train_run(tmp_path, name, then, [*extra, f"parallel.context_parallel={then}", "train.max_steps=9"])
        got = read_metrics(out)
        assert [m["step"] for m in got] == list(range(1, 10)), name
        for x, y in zip(ref[6:], got[6:]):
            assert abs(x["loss"] - y["loss"]) < 1e-5, (name, x["step"], x["loss"], y["loss"])


@pytest.mark.slow
@pytest.mark.parametrize("sharding", [[], ["parallel.sharding=hybrid", "parallel.shard_group_size=2"]],
                         ids=["full", "hybrid"])
def test_data2_x_cp2_on_four_ranks_trains_like_two_data_ranks(tmp_path, sharding):
    """Full sharding over the 4 ranks, or hybrid: 2 replicas of a shard group of 2 (a context group each)."""
    extra = ["data.packing=true", "data.pack_length=128", "train.micro_batch_size=2"]
    dp2, cp = train_run(tmp_path, "dp2", 2, extra), train_run(tmp_path, "dp2cp2", 4,
                                                            ["parallel.context_parallel=2", *extra, *sharding])
    assert_same_training(dp2, cp)
    # the memory tracker under CP: every rank records every phase of every step, each micro-batch's padded tokens
    # are its half of the data rank's rows, and a context group's real tokens add up to the data rank's
    for rank in range(4):
        mine, data_rank = memory_records(cp, rank), memory_records(dp2, rank // 2)
        assert [(r["step"], r["phase"], r["micro"]) for r in mine] == \
            [(r["step"], r["phase"], r["micro"]) for r in data_rank]
        assert [2 * r["batch_tokens"] for r in mine] == [r["batch_tokens"] for r in data_rank]
        assert all(r["allocated_peak"] >= r["allocated"] > 0 for r in mine)
    for group in range(2):
        halves = [memory_records(cp, 2 * group + i) for i in range(2)]
        assert [a["tokens"] + b["tokens"] for a, b in zip(*halves)] == \
            [r["tokens"] for r in memory_records(dp2, group)]


@pytest.mark.slow
def test_out_of_memory_inside_the_ulysses_exchange_stops_both_ranks_with_one_post_mortem(tmp_path):
    """Rank 1 runs out of memory before its key exchange of layer 0 in step 2 while rank 0 waits for it in the
    all-to-all: one line, rank 1's post-mortem (layer 0's gathered weights live), rank 0 freed by the peer
    watchdog long before the collective timeout."""
    import time

    import yaml

    from fsdptrain.memory import estimate

    layers = LLAMA["num_hidden_layers"]
    cfg = {"output_dir": str(tmp_path / "run"), "model": {"hf_config": {**LLAMA, "vocab_size": 100}},
           "data": {"synthetic_examples": 48, "max_length": 48}, "train": {"max_steps": 4},
           "parallel": {"device": "cpu", "precision": "fp32", "context_parallel": 2},
           "logging": {"tensorboard": False, "progress": "none"}}
    (tmp_path / "oom.yaml").write_text(yaml.safe_dump(cfg))
    # three exchanges (query, key, value) per layer and forward: the 2nd of step 2 is its key of layer 0
    spec = {"oom": {"config": str(tmp_path / "oom.yaml"), "rank": 1, "in": "ulysses", "at_call": 3 * layers + 2}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    t0 = time.perf_counter()
    proc = torchrun(2, ["-m", "tests.workers.mem_cases", str(tmp_path / "spec.json")], timeout=300)
    assert proc.returncode != 0 and time.perf_counter() - t0 < 200
    mem = tmp_path / "run" / "memory"
    errors = [x for x in proc.stderr.splitlines() if x.startswith("fsdptrain: error:")]
    assert errors == [f"fsdptrain: error: rank 1 ran out of memory at step 2 (forward of micro-batch 0); "
                      f"post-mortem: {mem / 'oom_rank1.txt'}, {mem / 'oom_rank1_stats.json'}"], proc.stderr[-3000:]
    assert "fsdptrain/trainer.py" not in proc.stderr  # no traceback from the waiting rank
    post = json.loads((mem / "oom_rank1_stats.json").read_text())
    exact = estimate.model_state(estimate.shape_from_config(load_config(str(tmp_path / "oom.yaml"))), 2, 1, 4)
    assert post["rank"] == 1 and post["step"] == 2
    assert post["owners"]["parameters (sharded)"] == exact.params
    assert post["owners"]["optimizer state"] == exact.optimizer
    assert post["owners"]["parameters (gathered)"] > 0  # mid-forward (activations: no CPU allocator to list them)
    assert "rank 1, step 2, forward of micro-batch 0" in (mem / "oom_rank1.txt").read_text()
    assert not (mem / "oom_rank0.txt").exists()


def memory_records(run: Path, rank: int) -> list[dict]:
    return [json.loads(x) for x in (run / "memory" / f"rank{rank}.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("override,text", [
    ("data.token_budget=512", "parallel.context_parallel: 2: does not work with data.token_budget yet"),
    ("data.balance=[1,1]", "parallel.context_parallel: 2: does not work with data.balance yet"),
    ("data.micro_batch_sizes=[2,4]", "parallel.context_parallel: 2: does not work with data.micro_batch_sizes yet"),
    ("parallel.compile=true", "parallel.context_parallel: 2: does not work with parallel.compile yet (compiled "
                                "blocks around the Ulysses exchange"),
    ("model.attn_implementation=flash_attention_2", "the attention inside Ulysses is sdpa, not "
                                                    "model.attn_implementation=flash_attention_2"),
])
def test_refused_combinations(override, text):
    overrides = ["parallel.context_parallel=2", override]
    if "flash" in override:
        overrides.append("parallel.precision=bf16-mixed")
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert text in str(e.value)
    assert "\n" not in str(e.value)


def test_n_must_divide_the_world():
    with pytest.raises(ConfigError, match=r"^parallel.context_parallel: 3 does not divide the world size 4; "):
        layout(3, 4, 0)


def meta_model(fields: dict):
    from transformers import AutoConfig

    from fsdptrain.model import models

    cfg = AutoConfig.for_model(fields.pop("model_type"), vocab_size=64, **fields)
    ulysses.register()
    return models.build_meta_model(cfg, ulysses.NAME, torch.float32, False), cfg


def test_model_refusals():
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_key_value_heads": 2}
    model, cfg = meta_model({"model_type": "llama", "num_attention_heads": 4, **small})
    ulysses.check_model(model, cfg, 2)  # 4 heads over 2 ranks: fine
    with pytest.raises(ConfigError, match=r"^parallel.context_parallel: 8 does not divide the 4 attention heads "
                                          r"of llama; use a divisor of 4$"):
        ulysses.check_model(model, cfg, 8)
    model, cfg = meta_model({"model_type": "mistral", "num_attention_heads": 4, "sliding_window": 8, **small})
    with pytest.raises(ConfigError, match="mistral uses sliding-window attention"):
        ulysses.check_model(model, cfg, 2)
    model, cfg = meta_model({"model_type": "mamba", "hidden_size": 32, "num_hidden_layers": 1})
    with pytest.raises(ConfigError, match=r"mamba \(MambaForCausalLM\) does not call transformers' attention "
                                          "interface"):
        ulysses.check_model(model, cfg, 2)


# ----------------------------------------------------------------------------- compositions: one launch per size


def composition_configs(root: Path, cp: int) -> dict[str, dict]:
    """The cases of `test_compositions_train_like_cp1`, for context parallel size `cp` (outputs under root/cpN)."""
    from tests import test_kto, test_preference
    from tests.reference import base_config

    llama, out = root / "llama", root / f"cp{cp}"
    pref_root, kto_root = root / "pref", root / "kto"
    accum = {"micro_batch_size": 1, "grad_accum_steps": 2, "eval_every": 3, "eval_micro_batch_size": 3}
    lora = {"finetune": {"method": "lora", "lora": test_preference.LORA}}
    sft = {"data": {"synthetic_examples": 200}, "train": {"micro_batch_size": 4, "grad_accum_steps": 2}}

    def sft_case(**sections: dict) -> dict:
        merged = {k: {**sft.get(k, {}), **sections.get(k, {})} for k in {*sft, *sections}}
        return base_config(out, llama, **merged)

    cases = {
        # SFT: evaluation every 3 steps (whole rows on every rank), packing (rows of 128, about 3 documents each,
        # straddling the chunks), full checkpointing with the chunked loss, LoRA
        "sft-eval": sft_case(data={"val_size": 0.1}, train={"eval_every": 3}),
        "sft-packing": sft_case(data={"packing": True, "pack_length": 128}),
        "sft-full-chunked": sft_case(parallel={"activation_checkpointing": "full"},
                                     train={"loss_chunk_tokens": 64}),
        "sft-lora": sft_case(finetune={"method": "lora"}),
        # a frozen copy of the starting weights as the reference; evaluation on held-out pairs
        "dpo-sigmoid": test_preference.dpo_config(pref_root, "x", llama, pref={"label_smoothing": 0.1},
                                                   train=accum),
        # the per-token mean (summed target counts) and the policy with its adapters off as the reference
        "dpo-ipo-lora": test_preference.dpo_config(pref_root, "x", llama, "sharegpt_pairs",
                                                    {"loss": "ipo", "beta": 0.5, "ftx": 0.5}, **lora),
        # preference.ref_model: a separate frozen copy of another folder (here under freeze), hinge
        "dpo-hinge-ref-model": test_preference.dpo_config(
            pref_root, "x", llama, pref={"loss": "hinge", "beta": 0.05, "ref_model": str(root / "ref")},
            finetune={"method": "freeze", "freeze": {"trainable_layers": 1}}),
        # reference-free: no reference forward, per-token means
        "dpo-simpo": test_preference.dpo_config(pref_root, "x", llama, pref={"loss": "simpo", "beta": 0.5}),
        # reference-free with the chosen rows' SFT term (per-token mean) inside the loss
        "dpo-orpo": test_preference.dpo_config(pref_root, "x", llama, pref={"loss": "orpo", "beta": 0.2}),
        "kto": test_kto.kto_config(kto_root, "x", llama, train={"micro_batch_size": 2, "grad_accum_steps": 2}),
        "rm": test_preference.dpo_config(pref_root, "x", llama, train=accum),
        "freeze-selective": base_config(out, llama, finetune={"method": "freeze", "freeze": {"trainable_layers": 1}},
                                        parallel={"activation_checkpointing": "selective"}),
        # the router's balancing loss over the whole rows (model/moe.py balance_over_context)
        "moe-every-k": base_config(out, root / "moe", train={"router_aux_loss_coef": 0.1},
                                   parallel={"activation_checkpointing": "every_k", "activation_checkpointing_k": 2}),
    }
    cases["rm"]["train"]["objective"] = "rm"
    for name, cfg in cases.items():
        if "eval_every" in cfg["train"] and "datasets" in cfg["data"]:  # held-out pairs of another data set
            cfg["data"]["eval_datasets"] = ["sharegpt_pairs"]
        cfg["output_dir"] = str(out / name)
        cfg["parallel"].update(context_parallel=cp)
        cfg["checkpoint"] = {"export_hf": "lora" not in name}
    return cases


@pytest.fixture(scope="module")
def compositions(tmp_path_factory):
    """Every case trained with CP=2 on 2 ranks (one launch) and with CP=1 on 1 rank (one launch)."""
    import json

    import yaml

    from tests import test_kto, test_preference
    from tests.reference import synthetic_examples

    root = tmp_path_factory.mktemp("cp-compositions")
    llama = make_model_dir(root / "llama", LLAMA, seed=1)
    make_model_dir(root / "moe", FAMILIES["qwen3_moe"], seed=1)
    make_model_dir(root / "ref", LLAMA, seed=2)  # preference.ref_model: other weights than the policy's
    for sub, module in (("pref", test_preference), ("kto", test_kto)):
        (root / sub).mkdir()
        module.data_dir(root / sub)
    ids = synthetic_examples(llama)[0].input_ids
    for cp in (2, 1):
        spec = {"cases": [], "ids": ids}
        for name, cfg in composition_configs(root, cp).items():
            path = root / f"{name}-cp{cp}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            spec["cases"].append({"config": str(path), "kind": "train",
                                  "logits_out": str(root / f"{name}-cp{cp}-logits.safetensors")})
        for name in EVALUATED:  # `fsdptrain eval` of each run's last checkpoint, with the run's own config
            spec["cases"].append({"config": str(root / f"{name}-cp{cp}.yaml"), "kind": "eval",
                                  "source": str(root / f"cp{cp}" / name), "out": str(root / f"{name}-cp{cp}.eval")})
        (root / f"spec{cp}.json").write_text(json.dumps(spec))
        proc = torchrun(cp, ["-m", "tests.workers.lora_cases", str(root / f"spec{cp}.json")], timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return root


COMPOSITIONS = ("sft-eval", "sft-packing", "sft-full-chunked", "sft-lora", "dpo-sigmoid", "dpo-ipo-lora",
                "dpo-hinge-ref-model", "dpo-simpo", "dpo-orpo", "kto", "rm", "freeze-selective", "moe-every-k")
EVALUATED = ("sft-eval", "dpo-sigmoid", "rm")  # the cases with eval data


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPOSITIONS)
def test_compositions_train_like_cp1(compositions, name):
    """SFT (with evaluation, packing, full checkpointing with the chunked loss, LoRA), the preference objectives
    (whole-row sums over the context group), MoE with the router's auxiliary loss, freeze, selective and every_k
    checkpointing: with CP=2 on 2 ranks as with CP=1 on 1 rank, every step's loss, units, metrics and gradient
    norm, the evaluations, the trained model's logits and the final weights (LoRA: the exported adapters)."""
    from safetensors.torch import load_file

    one, two = compositions / "cp1" / name, compositions / "cp2" / name
    a, b = read_metrics(one), read_metrics(two)
    assert [m["step"] for m in b] == list(range(1, 7))
    for x, y in zip(a, b):
        assert x["target_tokens"] == y["target_tokens"] and x["tokens"] == y["tokens"], x["step"]
        # within 1e-5, relative above 1 (fp32's rounding of the row sums, now added up chunk by chunk, amplified
        # by ipo's square and over the steps); KTO's KL and the rewards, (beta x) differences of summed
        # log-probabilities, relative to those (as tests/test_kto.py against TRL)
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * max(1.0, abs(x["loss"])), (name, x["step"], x["loss"], y["loss"])
        assert abs(x["grad_norm"] - y["grad_norm"]) < 1e-4 * max(1.0, x["grad_norm"]), x["step"]
        assert sorted(x) == sorted(y), x["step"]  # the same metrics, evaluations included
        logps = max([1.0, *(abs(v) for k, v in x.items() if k.startswith(("logps/", "eval_logps/")))])
        for key in x:
            if key.startswith(("rewards/", "logps/", "kl", "share/", "eval_", "aux_loss", "moe_")) and \
                    not key.endswith("_s"):
                ratio = key == "kl" or (key.startswith(("rewards/", "eval_rewards/")) and "accuracies" not in key)
                scale = logps if ratio else max(1.0, abs(x[key]))
                assert abs(x[key] - y[key]) <= 1e-5 * scale, (name, x["step"], key, x[key], y[key])
    if name in EVALUATED:
        assert [m["step"] for m in b if "eval_loss" in m] == [3, 6]
        # `fsdptrain eval` of the last checkpoint, under each run's own config (CP=2 on 2 ranks: whole rows per
        # rank, Ulysses idle), gives the run's own step-6 evaluation; and the CP=2 checkpoint's equals the CP=1's
        results = [json.loads((compositions / f"{name}-cp{cp}.eval").read_text()) for cp in (1, 2)]
        assert [r["step"] for r in results] == [6, 6] and [r["world_size"] for r in results] == [1, 2]
        for run, res in zip((a, b), results):
            for key, value in run[-1].items():
                if key.startswith("eval_") and not key.endswith("_s"):
                    assert abs(res[key] - value) <= 1e-6 * max(1.0, abs(value)), (name, key, res[key], value)
        assert abs(results[0]["eval_loss"] - results[1]["eval_loss"]) <= 1e-5 * max(1.0, results[0]["eval_loss"])
    if name == "sft-lora":  # the adapters (PEFT layout), exported after training
        for run in (one, two):
            proc = run_cli(["export", str(run), "--out", str(run / "hf")])
            assert proc.returncode == 0, proc.stderr[-2000:]
    # simpo: beta (c - r) of two per-token means of about -65 on this random model cancels (1 ulp of them: 8e-6,
    # where a reference's log-ratios start at exactly 0), and by step 6 its gradient norm is 6e-5, so Adam's
    # normalised steps carry that rounding into the weights: 3e-5 apart in 2 of 12k weights. orpo: losses equal
    # to 1e-7 relative, yet 1 of 117k weights 1.5e-5 apart after 6 steps (lr 5e-3; a near-zero gradient element,
    # whose normalised step carries the rounding of the per-token means added up chunk by chunk)
    atol = 5e-5 if name in ("dpo-simpo", "dpo-orpo") else 1e-5
    if (one / "hf").exists():
        assert_same_exports(one, two, atol)
    logits = [load_file(str(compositions / f"{name}-cp{cp}-logits.safetensors"))["logits"] for cp in (1, 2)]
    # the weights' rounding differences summed over the hidden size: 1e-5 of the largest logit (about 70)
    assert (logits[0] - logits[1]).abs().max() <= 1e-5 * logits[0].abs().max(), (logits[0] - logits[1]).abs().max()


def test_a_balancing_loss_that_cannot_be_combined_is_refused():
    """A family whose module has no transformers-style balancing-loss function (router logits first)."""
    from types import SimpleNamespace

    from fsdptrain.model import moe

    class Routed(torch.nn.Module):
        config = SimpleNamespace(model_type="routed")

    with pytest.raises(ConfigError, match=r"^parallel.context_parallel: model_type 'routed' computes its router "
                                          r"auxiliary loss in a way fsdptrain cannot combine over the context group; "
                                          r"set train.router_aux_loss_coef=0 or parallel.context_parallel=1$"):
        moe.balance_over_context(Routed())
