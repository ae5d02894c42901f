"""Reward models (train.objective rm): the family's ForSequenceClassification with one label, pairwise loss.

One 2-rank torchrun launch trains two cases (tests/workers/lora_cases.py, its `train` kind): full fine-tuning with
gradient accumulation, held-out pairs and the Hugging Face export, and LoRA (the score head trains in full). The
oracle: a plain single-process loop on transformers' own AutoModelForSequenceClassification (its `.logits`: the
score at each row's last non-pad token, a chosen and a rejected row padded into one batch), -log sigmoid(c - r)
meaned over the step's pairs, AdamW as tests/reference.py; LoRA through peft's SEQ_CLS model (score in
modules_to_save). Then the export round trip: the exported folders load with AutoModelForSequenceClassification
(full, LoRA merged, and the PEFT adapter) and score as the trained model did.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.helpers import LLAMA, cli_inproc, make_model_dir, read_metrics, torchrun
from tests.reference import HYPER, STEPS, base_config, optimizer_and_schedule
from tests.test_bad_inputs import one_line_error
from tests.test_finetune import copy_adapter_init
from tests.test_preference import data_dir
from tests.test_preference import write_cfg as write_pair_cfg

LN2 = float(torch.tensor(math.log(2), dtype=torch.float32))
LORA = {"rank": 8, "alpha": 16, "target": "all"}
IDS = [5, 17, 42, 9, 33, 71, 2, 12]  # the trained model's score on these is saved (rank 0) for the export checks

CASES = {
    "rm_full_accum": ("alpaca_pairs", {"train": {"micro_batch_size": 1, "grad_accum_steps": 2, "eval_every": 3,
                                                 "eval_micro_batch_size": 3},
                                       "checkpoint": {"export_hf": True}}),
    "rm_lora": ("sharegpt_pairs", {"finetune": {"method": "lora", "lora": LORA}}),
}


def rm_config(root: Path, name: str, model: Path, dataset: str = "alpaca_pairs", **sections) -> dict:
    data = {"dataset_dir": str(root / "data"), "datasets": [dataset], "max_length": 64,
            "cache_dir": str(root / "cache")}
    cfg = base_config(root / name, model, data=data, **sections)
    cfg["train"]["objective"] = "rm"
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    llama = make_model_dir(root / "llama", LLAMA, seed=1)
    data_dir(root)
    spec: dict = {"cases": [], "ids": IDS}
    for name, (dataset, sections) in CASES.items():
        path = root / f"{name}.yaml"
        cfg = rm_config(root, name, llama, dataset, **sections)
        if "eval_every" in cfg["train"]:
            cfg["data"]["eval_datasets"] = ["sharegpt_pairs"]
        path.write_text(yaml.safe_dump(cfg))
        spec["cases"].append({"config": str(path), "kind": "train", "logits_out": str(root / f"{name}.scores")})
    (root / "spec.json").write_text(json.dumps(spec))
    proc = torchrun(2, ["-m", "tests.workers.lora_cases", str(root / "spec.json")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, llama


def reward_model(llama: Path, lora: bool, seed: int, pad_id: int):
    """transformers' sequence-classification model on the causal LM's weights, score zeroed (as fsdptrain starts
    it); with LoRA, peft's SEQ_CLS model with lora_A from fsdptrain's seeded init."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(llama), num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = pad_id
    with torch.no_grad():
        model.score.weight.zero_()
    if not lora:
        return model
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=LORA["rank"], lora_alpha=LORA["alpha"],
                                             lora_dropout=0.0, target_modules="all-linear"))
    # the blocks' linears only: not the score head
    assert copy_adapter_init(model, seed) == 7 * LLAMA["num_hidden_layers"]
    return model


def pair_scores(model, pair, pad_id: int) -> torch.Tensor:
    """(chosen, rejected) scores: both rows right-padded into one batch; transformers picks the last non-pad
    token of each."""
    rows = [pair.chosen.input_ids, pair.rejected.input_ids]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return model(input_ids=ids, attention_mask=mask).logits[:, 0].float()


def reward_reference(model, pairs, batches: list[list[int]], pad_id: int) -> dict[str, list[float]]:
    opt, factor = optimizer_and_schedule(model, STEPS)
    out: dict[str, list[float]] = {"loss": [], "rewards/chosen": [], "rewards/accuracies": [], "rewards/margins": []}
    for s, idx in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = HYPER["lr"] * factor(s)
        total, chosen, acc, margin = 0.0, 0.0, 0.0, 0.0
        for i in idx:
            c, r = pair_scores(model, pairs[i], pad_id)
            total = total - F.logsigmoid(c - r)
            chosen, acc, margin = chosen + c.item(), acc + float(c.item() > r.item()), margin + (c - r).item()
        mean = total / len(idx)
        mean.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], HYPER["clip"])
        opt.step()
        opt.zero_grad()
        for key, v in zip(out, (mean.item(), chosen / len(idx), acc / len(idx), margin / len(idx))):
            out[key].append(v)
    return out


def reference_for(root: Path, llama: Path, name: str) -> dict:
    from fsdptrain.config.schema import load_config
    from fsdptrain.data import pipeline
    from fsdptrain.data.loader import StepSampler
    from fsdptrain.data.tokenizer import load_tokenizer

    cfg = load_config(str(root / f"{name}.yaml"))
    tok = load_tokenizer(None, str(llama))
    pairs = pipeline.load_examples(cfg, tok, log=lambda m: None)
    sampler = StepSampler(len(pairs), world_size=1, rank=0, micro_batch_size=4, grad_accum_steps=1, seed=7)
    batches = [sampler.global_indices(s) for s in range(STEPS)]
    model = reward_model(llama, cfg.finetune.method == "lora", cfg.seed, tok.pad_token_id)
    return reward_reference(model, pairs, batches, tok.pad_token_id)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.slow  # the module's 2-rank launch (about 40 s)
def test_two_rank_reward_model_matches_transformers_sequence_classification(runs, name):
    root, llama = runs
    got = read_metrics(root / name)
    ref = reference_for(root, llama, name)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for key in ref:
        mine = [m[key] for m in got]
        assert all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for a, b in zip(mine, ref[key])), (key, mine, ref[key])
    assert len({m["loss"] for m in got}) > 1


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.slow  # the module's 2-rank launch (about 40 s)
def test_step_one_scores_zero_so_the_loss_is_ln2(runs, name):
    """The score head starts at zero: every reward 0 and the pairwise loss exactly ln 2 at step 1."""
    first = read_metrics(runs[0] / name)[0]
    assert first["loss"] == LN2
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0.0
    assert first["target_tokens"] == 4  # the step's units: 4 pairs


@pytest.mark.slow  # the module's 2-rank launch (about 40 s)
def test_evaluation_on_held_out_pairs_counts_each_pair_once(runs):
    evals = [m for m in read_metrics(runs[0] / "rm_full_accum") if "eval_loss" in m]
    assert [m["step"] for m in evals] == [3, 6]
    for m in evals:
        assert m["eval_tokens"] == 32
        assert m["eval_rewards/accuracies"] * 32 % 1 == 0 and math.isfinite(m["eval_loss"])


def trained_score(root: Path, name: str) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(root / f"{name}.scores"))["logits"]


def score_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([IDS])).logits


@pytest.mark.slow  # the module's 2-rank launch (about 40 s)
def test_full_export_loads_as_sequence_classification_and_scores_equal(runs):
    from transformers import AutoModelForSequenceClassification

    root, _ = runs
    hf = root / "rm_full_accum" / "hf"
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    model = AutoModelForSequenceClassification.from_pretrained(str(hf), dtype=torch.float32)
    assert model.config.num_labels == 1 and model.score.weight.abs().sum() > 0
    torch.testing.assert_close(score_of(model), trained_score(root, "rm_full_accum"))


@pytest.mark.slow  # the module's 2-rank launch (about 40 s)
def test_lora_export_merged_and_as_adapter_scores_equal(runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    root, llama = runs
    ckpt = str(root / "rm_lora")
    assert cli_inproc(["export", ckpt, "--out", str(tmp_path / "merged"), "--merge"]).returncode == 0
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    want = trained_score(root, "rm_lora")
    torch.testing.assert_close(score_of(merged), want)
    assert cli_inproc(["export", ckpt, "--out", str(tmp_path / "adapter")]).returncode == 0
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and adapter["modules_to_save"] == ["score"]
    base = AutoModelForSequenceClassification.from_pretrained(str(llama), num_labels=1, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(score_of(model), want)


# ----------------------------------------------------------------------------- bad input, one line each


def write_cfg(tmp_path: Path, dataset: str = "alpaca_pairs", **overrides) -> Path:
    return write_pair_cfg(tmp_path, lambda root, name, model: rm_config(root, name, model, dataset), **overrides)


@pytest.mark.parametrize("overrides, parts", [
    ({"data__packing": True}, ["data.packing with train.objective rm", "set data.packing=false"]),
    ({"train__loss_chunk_tokens": 64}, ["train.loss_chunk_tokens with train.objective rm", "set it to 0"]),
    ({"preference__beta": 0.2}, ["preference.* belongs to train.objective dpo, not rm"]),
])
def test_bad_reward_settings_are_one_line(tmp_path, overrides, parts):
    one_line_error(cli_inproc(["data", str(write_cfg(tmp_path, **overrides))]), *parts)


def test_reward_model_on_non_ranking_data_is_one_line(tmp_path):
    one_line_error(cli_inproc(["data", str(write_cfg(tmp_path, "sft"))]),
                   "data set 'sft' is not preference data", "train.objective rm trains on pairs")


def test_a_family_without_a_sequence_classification_model_is_one_line():
    from fsdptrain.core.errors import UserError
    from fsdptrain.model.models import as_reward_config, load_hf_config

    cfg = load_hf_config(None, {"model_type": "cohere", "hidden_size": 64, "num_hidden_layers": 1,
                                "num_attention_heads": 4, "intermediate_size": 128}, 256, False)
    with pytest.raises(UserError, match="transformers has no sequence-classification model for 'cohere'; "
                                        "train.objective rm needs one"):
        as_reward_config(cfg, 0)


def test_a_reward_model_folder_is_refused_for_sft(tmp_path):
    """A reward model (no language-model head) trained with sft: one line at start-up, before any weight loads."""
    from fsdptrain.config.schema import load_config
    from fsdptrain.core.errors import UserError
    from fsdptrain.data.tokenizer import load_tokenizer
    from fsdptrain.trainer import setup_hf_config

    model = make_model_dir(tmp_path / "llama", {**LLAMA, "num_hidden_layers": 1})
    config = json.loads((model / "config.json").read_text())
    config.update(architectures=["LlamaForSequenceClassification"], id2label={"0": "LABEL_0"},
                  label2id={"LABEL_0": 0})
    (model / "config.json").write_text(json.dumps(config))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(base_config(tmp_path / "run", model)))
    with pytest.raises(UserError, match="holds a reward model \\(LlamaForSequenceClassification, no language-model "
                                        "head\\); train it with train.objective=rm"):
        setup_hf_config(load_config(str(path)), load_tokenizer(None, str(model)))
