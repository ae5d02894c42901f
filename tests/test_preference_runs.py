"""Preference and reward runs beyond the losses (tests/test_preference.py, tests/test_reward.py): a reference model
of its own (preference.ref_model), `fsdptrain eval` of dpo and rm checkpoints, 1 vs 2 ranks, and LLaMA-Factory's
own dpo_zh_demo pairs with a real tokenizer.

One 2-rank torchrun launch (tests/workers/lora_cases.py) trains every 2-rank case and evaluates the dpo and rm
checkpoints with `fsdptrain eval`; the 1-rank runs and evaluations run in this process (world size 1). The
ref_model oracle is tests/reference.py's preference_reference: log-probabilities from transformers, the loss by
TRL's code, the reference a transformers model loaded from the ref_model folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import LLAMA, QWEN2, cli_inproc, make_model_dir, read_metrics, torchrun
from tests.reference import STEPS
from tests.test_preference import LF, LN2, LORA, data_dir, dpo_config
from tests.test_reward import rm_config

SHARED_TOKENIZERS = LF.parents[1] / "tokenizers"
QWEN3_TOKENIZER = SHARED_TOKENIZERS / "qwen3"
EVAL = {"eval_every": 3, "eval_micro_batch_size": 3}  # 32 held-out pairs: the last round of 2 ranks is padded


def one_and_two_ranks(root: Path, name: str, make, model: Path) -> dict[int, Path]:
    """The same run on 2 ranks (2 pairs per rank) and on 1 (2 micro-batches of 2 pairs: the same global batch of
    4 pairs, each micro-batch the one a rank of the 2-rank run computes)."""
    paths = {}
    for world, accum in ((2, 1), (1, 2)):
        cfg = make(root, f"{name}_w{world}", model)
        cfg["train"].update(micro_batch_size=2, grad_accum_steps=accum, **EVAL)
        cfg["data"]["eval_datasets"] = ["sharegpt_pairs"]
        paths[world] = root / f"{name}_w{world}.yaml"
        paths[world].write_text(yaml.safe_dump(cfg))
    return paths


# LoRA and freeze runs with held-out pairs on 2 ranks: their checkpoints hold the trainable weights only, and the
# freeze reference swaps its initial shards in under the policy's evaluation forwards
PARTIAL = {
    "dpo_lora": (dpo_config, {"finetune": {"method": "lora", "lora": LORA}}),
    "dpo_freeze": (dpo_config, {"finetune": {"method": "freeze", "freeze": {"trainable_layers": 1}}}),
    "rm_lora": (rm_config, {"finetune": {"method": "lora", "lora": LORA}}),
}


def partial_config(root: Path, name: str, model: Path) -> Path:
    make, sections = PARTIAL[name]
    cfg = make(root, name, model, **sections)
    cfg["train"].update(max_steps=3, **EVAL)
    cfg["data"]["eval_datasets"] = ["sharegpt_pairs"]
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def lf_demo_model(path: Path) -> Path:
    """A tiny Qwen3 model folder with the real Qwen3 tokenizer (its 151,669 tokens) beside the weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(QWEN3_TOKENIZER))
    cfg = AutoConfig.for_model("qwen3", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                               max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def lf_demo_config(root: Path, model: Path) -> dict:
    """LLaMA-Factory's dpo_zh_demo (sharegpt pairs) through its own dataset_info.json, the qwen3_nothink template
    its qwen3_lora_dpo.yaml example uses, full fine-tuning (the reference a frozen copy of the policy)."""
    cfg = dpo_config(root, "lf_demo", model)
    cfg["data"] = {"dataset_dir": str(LF), "datasets": ["dpo_zh_demo"], "template": "qwen3_nothink",
                   "max_length": 96, "max_samples": 8, "cache_dir": str(root / "cache-lf")}
    cfg["train"].update(max_steps=2, micro_batch_size=1)
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefruns")
    llama = make_model_dir(root / "llama", LLAMA, seed=1)
    ref = make_model_dir(root / "ref", LLAMA, seed=2)  # the same family and vocabulary, other weights
    data_dir(root)
    configs = {"ref_lora": root / "ref_lora.yaml"}
    configs["ref_lora"].write_text(yaml.safe_dump(dpo_config(
        root, "ref_lora", llama, pref={"ref_model": str(ref)}, finetune={"method": "lora", "lora": LORA})))
    dpo = one_and_two_ranks(root, "dpo", dpo_config, llama)
    rm = one_and_two_ranks(root, "rm", rm_config, llama)
    cases = [{"config": str(p), "kind": "train"} for p in (configs["ref_lora"], dpo[2], rm[2])]
    for name, paths in (("dpo", dpo), ("rm", rm)):  # `fsdptrain eval` of the 2-rank run's last checkpoint
        cases.append({"config": str(paths[2]), "kind": "eval", "source": str(root / f"{name}_w2"),
                      "out": str(root / f"eval-{name}-2.json")})
    for name in PARTIAL:
        path = partial_config(root, name, llama)
        cases += [{"config": str(path), "kind": "train"},
                  {"config": str(path), "kind": "eval", "source": str(root / name),
                   "out": str(root / f"eval-{name}.json")}]
    if QWEN3_TOKENIZER.is_dir() and (LF / "dpo_zh_demo.json").is_file():
        configs["lf_demo"] = root / "lf_demo.yaml"
        configs["lf_demo"].write_text(yaml.safe_dump(lf_demo_config(root, lf_demo_model(root / "qwen3"))))
        cases.append({"config": str(configs["lf_demo"]), "kind": "train"})
    (root / "spec.json").write_text(json.dumps({"cases": cases}))
    proc = torchrun(2, ["-m", "tests.workers.lora_cases", str(root / "spec.json")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    (root / "stdout.txt").write_text(proc.stdout + proc.stderr)
    return root, llama, ref, dpo, rm


@pytest.fixture(scope="module")
def one_rank(runs):
    """The 1-rank runs and the 1-rank `fsdptrain eval` of the 2-rank checkpoints, in this process."""
    from fsdptrain import trainer
    from fsdptrain.config.schema import load_config

    root, _, _, dpo, rm = runs
    out = {}
    for name, paths in (("dpo", dpo), ("rm", rm)):
        trainer.train(load_config(str(paths[1])))
        proc = cli_inproc(["eval", str(paths[2]), "--checkpoint", str(root / f"{name}_w2"), "--out",
                           str(root / f"eval-{name}-1.json")])
        assert proc.returncode == 0, proc.stderr
        out[name] = proc.stdout + proc.stderr
    return out


# ----------------------------------------------------------------------------- preference.ref_model


@pytest.mark.slow  # the module's 2-rank launch (about a minute on 2 shared cores)
def test_ref_model_is_the_reference_under_lora(runs):
    """preference.ref_model names a folder whose weights differ from the policy's: a separate frozen copy even
    under LoRA. The 2-rank losses and rewards equal transformers + TRL's DPO loss with that folder as the
    reference, within 1e-5 over 6 steps; so step 1 is not ln 2 and its rewards are not 0."""
    from transformers import AutoModelForCausalLM

    from fsdptrain.config.schema import load_config
    from fsdptrain.data import pipeline
    from fsdptrain.data.loader import StepSampler
    from fsdptrain.data.tokenizer import load_tokenizer
    from tests.reference import preference_reference
    from tests.test_finetune import peft_model

    root, llama, ref, _, _ = runs
    cfg = load_config(str(root / "ref_lora.yaml"))
    assert cfg.preference.ref_model == str(ref)
    pairs = pipeline.load_examples(cfg, load_tokenizer(None, str(llama)), log=lambda m: None)
    sampler = StepSampler(len(pairs), world_size=1, rank=0, micro_batch_size=4, grad_accum_steps=1, seed=7)
    reference = AutoModelForCausalLM.from_pretrained(str(ref), dtype=torch.float32).eval()
    want = preference_reference(peft_model(llama, LORA, cfg.seed), reference, pairs,
                                [sampler.global_indices(s) for s in range(STEPS)], {})
    got = read_metrics(root / "ref_lora")
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for key in ("loss", "rewards/chosen", "rewards/accuracies", "logps/rejected"):
        mine = [m[key] for m in got]
        assert all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for a, b in zip(mine, want[key])), (key, mine, want[key])
    assert abs(got[0]["loss"] - LN2) > 1e-3 and got[0]["rewards/chosen"] != 0.0
    log = (root / "stdout.txt").read_text()
    assert f"reference model: a frozen sharded copy of {ref} (under lora a separate copy: the reference is not " \
           "the policy's base)" in log


@pytest.mark.parametrize("arch, vocab, error", [
    (QWEN2, None, "is a qwen2 model but the policy is llama"),
    (LLAMA, 300, "has vocab_size 300 but the policy's is "),
])
def test_ref_model_of_another_family_or_vocabulary_is_one_line(tmp_path, arch, vocab, error):
    from transformers import AutoConfig

    from fsdptrain.config.schema import load_config
    from fsdptrain.core.errors import UserError
    from fsdptrain.data.tokenizer import build_char_tokenizer, load_tokenizer
    from fsdptrain.train.build import reference_config
    from fsdptrain.trainer import setup_hf_config

    llama = make_model_dir(tmp_path / "llama", {**LLAMA, "num_hidden_layers": 1})
    other = tmp_path / "other"
    other.mkdir()
    fields = {**arch, "num_hidden_layers": 1}
    config = AutoConfig.for_model(fields.pop("model_type"), vocab_size=vocab or len(build_char_tokenizer()),
                                  **fields)
    config.save_pretrained(str(other))  # the check reads the config only, before any weight
    data_dir(tmp_path)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(dpo_config(tmp_path, "run", llama, pref={"ref_model": str(other)})))
    cfg = load_config(str(path))
    policy = setup_hf_config(cfg, load_tokenizer(None, str(llama)))
    with pytest.raises(UserError) as e:
        reference_config(cfg, policy)
    assert str(e.value).startswith(f"preference.ref_model: {other} {error}")
    assert str(e.value).endswith("give a reference model of the policy's family and vocabulary (model.path), or "
                                 "remove preference.ref_model")
    cfg_missing = load_config(str(path), [f"preference.ref_model={tmp_path / 'nowhere'}"])
    with pytest.raises(UserError, match="preference.ref_model: .*nowhere: no config.json there"):
        reference_config(cfg_missing, policy)


def test_ref_model_with_a_reference_free_loss_is_one_line(tmp_path):
    from tests.test_bad_inputs import one_line_error
    from tests.test_preference import write_cfg

    path = write_cfg(tmp_path, preference__loss="simpo", preference__ref_model=str(tmp_path / "llama"))
    one_line_error(cli_inproc(["data", str(path)]), "preference.ref_model belongs to the losses with a reference "
                                                    "model (sigmoid, ipo, hinge), not simpo")


# ----------------------------------------------------------------------------- fsdptrain eval, 1 vs 2 ranks


@pytest.mark.slow  # the module's 2-rank launch and the 1-rank runs
@pytest.mark.parametrize("name", ["dpo", "rm"])
def test_one_and_two_ranks_train_alike(runs, one_rank, name):
    """The same global batches on 1 rank (2 micro-batches of 2 pairs) and on 2 ranks (2 pairs each): step 1 is
    bitwise equal (each micro-batch is one rank's, and the gradient scales are powers of two); the 6 losses within
    1e-6 (the later steps differ in the last bits: the clipping norm is summed over shards in another order)."""
    root = runs[0]
    one, two = read_metrics(root / f"{name}_w1"), read_metrics(root / f"{name}_w2")
    assert [m["step"] for m in one] == [m["step"] for m in two] == list(range(1, STEPS + 1))
    assert one[0]["loss"] == two[0]["loss"] == LN2  # policy = reference (dpo); the score head at zero (rm)
    assert all(abs(a["loss"] - b["loss"]) <= 1e-6 for a, b in zip(one, two)), ([m["loss"] for m in one],
                                                                              [m["loss"] for m in two])
    assert all(a["rewards/accuracies"] == b["rewards/accuracies"] for a, b in zip(one, two))
    assert len({m["loss"] for m in two}) > 1
    for m in one + two:  # held-out pairs: no perplexity (a loss per pair is no token NLL)
        assert "eval_ppl" not in m and ("eval_loss" in m) == (m["step"] in (3, 6))
    for a, b in zip(one, two):
        if "eval_loss" in a:
            assert a["eval_tokens"] == b["eval_tokens"] == 32
            assert abs(a["eval_loss"] - b["eval_loss"]) <= 1e-6


@pytest.mark.slow  # the module's 2-rank launch and the 1-rank runs
@pytest.mark.parametrize("name", ["dpo", "rm"])
def test_eval_command_scores_pairs_alike_on_one_and_two_ranks(runs, one_rank, name):
    """`fsdptrain eval` of the 2-rank run's last checkpoint (dpo: against the config's model.path as the
    reference; rm: the score head from the checkpoint): the loss per held-out pair and the reward accuracy, equal
    on 1 and 2 ranks (within 1e-6) and to the run's own evaluation after its last step; no eval_ppl."""
    root = runs[0]
    one, two = (json.loads((root / f"eval-{name}-{w}.json").read_text()) for w in (1, 2))
    trained = read_metrics(root / f"{name}_w2")[-1]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for res in (one, two):
        assert "eval_ppl" not in res and res["eval_tokens"] == 32 and res["step"] == STEPS
        assert abs(res["eval_loss"] - trained["eval_loss"]) <= 1e-6, (res["eval_loss"], trained["eval_loss"])
        assert res["eval_rewards/accuracies"] == trained["eval_rewards/accuracies"]
    assert abs(one["eval_loss"] - two["eval_loss"]) <= 1e-6
    assert math.isfinite(one["eval_loss"]) and one["eval_loss"] != LN2
    line = next(x for x in one_rank[name].splitlines() if x.startswith("eval ") and ": loss " in x)
    assert f"loss {one['eval_loss']:.6f} rewards/accuracies {one['eval_rewards/accuracies']:.4f} pairs 32 " in line
    assert "ppl" not in line


@pytest.mark.slow  # the module's 2-rank launch
@pytest.mark.parametrize("name", list(PARTIAL))
def test_lora_and_freeze_checkpoints_evaluate_as_the_run_did(runs, name):
    """`fsdptrain eval` of a LoRA / freeze checkpoint (its trainable weights only; the frozen ones from the config's
    model.path) equals the run's own evaluation after its last step, within 1e-6. For freeze dpo this also checks
    the run's evaluation: its reference swaps the initial trainable shards in under units that the policy's
    no-grad evaluation forward left gathered (before the fix their trained weights were reused: the run's eval
    loss was 0.39 off the command's here); the command's reference is a separate copy of model.path."""
    root = runs[0]
    got = json.loads((root / f"eval-{name}.json").read_text())
    trained = read_metrics(root / name)[-1]
    assert got["step"] == trained["step"] == 3 and got["eval_tokens"] == trained["eval_tokens"] == 32
    assert abs(got["eval_loss"] - trained["eval_loss"]) <= 1e-6, (got["eval_loss"], trained["eval_loss"])
    assert got["eval_rewards/accuracies"] == trained["eval_rewards/accuracies"]
    assert got["eval_loss"] < LN2 - 1e-3  # it trained


def test_eval_of_a_dpo_config_without_a_reference_folder_is_one_line(tmp_path):
    from tests.test_bad_inputs import one_line_error
    from tests.test_preference import write_cfg

    path = write_cfg(tmp_path, model__random_init=True, data__val_size=4)
    one_line_error(cli_inproc(["eval", str(path), "--checkpoint", str(tmp_path / "llama")]),
                   "eval: train.objective dpo compares with the reference model", "set preference.ref_model")


def test_pair_eval_results_have_no_perplexity():
    """A pair objective's eval metrics and line: no eval_ppl (its loss is no token NLL); SFT's keep it."""
    from fsdptrain.config.schema import Config, PreferenceConfig, TrainConfig
    from fsdptrain.objectives.choose import objective_for
    from fsdptrain.objectives.reward import REWARD
    from fsdptrain.objectives.sft import SFT
    from fsdptrain.train.evaluate import EvalResult

    extra = {"rewards/accuracies": 0.75, "rewards/chosen": 0.1}
    pairs = EvalResult(0.5, 32, 11, 1.0, extra, REWARD.token_nll, REWARD.unit)
    assert pairs.ppl is None and "eval_ppl" not in pairs.metrics()
    assert pairs.metrics()["eval_rewards/accuracies"] == 0.75
    assert pairs.summary() == "loss 0.500000 rewards/accuracies 0.7500 pairs 32"
    tokens = EvalResult(0.5, 320, 11, 1.0, {}, SFT.token_nll, SFT.unit)
    assert tokens.metrics()["eval_ppl"] == math.exp(0.5)
    assert tokens.summary() == f"loss 0.500000 ppl {math.exp(0.5):.4f} tokens 320"
    dpo = Config(train=TrainConfig(objective="dpo"), preference=PreferenceConfig(loss="simpo"))
    assert not objective_for(dpo).token_nll


# ----------------------------------------------------------------------------- LLaMA-Factory's own pairs


@pytest.mark.slow  # the module's 2-rank launch
def test_llamafactory_dpo_demo_trains_on_two_ranks_from_ln2(runs):
    """dpo_zh_demo (LLaMA-Factory's records, its dataset_info.json) with the real Qwen3 tokenizer and the
    qwen3_nothink template, from a model folder on 2 ranks: step 1 compares the policy with itself, so the loss
    is exactly ln 2 and every reward 0; step 2 has moved."""
    root = runs[0]
    if not (root / "lf_demo.yaml").is_file():
        pytest.skip(f"the LLaMA-Factory data or the Qwen3 tokenizer is not at {LF} / {QWEN3_TOKENIZER}")
    got = read_metrics(root / "lf_demo")
    assert [m["step"] for m in got] == [1, 2]
    assert got[0]["loss"] == LN2 and got[0]["rewards/margins"] == 0.0 and got[0]["target_tokens"] == 2
    assert got[0]["logps/chosen"] < 0 and got[1]["loss"] != LN2


def test_eval_line_of_pairs_shows_reward_accuracy_not_perplexity(tmp_path, monkeypatch):
    from fsdptrain.core import log
    from fsdptrain.objectives.reward import REWARD
    from fsdptrain.objectives.sft import SFT
    from fsdptrain.run.metrics import RunLogger
    from fsdptrain.train.evaluate import EvalResult

    lines: list[str] = []
    monkeypatch.setattr(log, "info", lines.append)
    logger = RunLogger(tmp_path, True, False, "lines", 6)
    pairs = EvalResult(0.5, 32, 11, 0.25, {"rewards/accuracies": 0.75}, REWARD.token_nll, REWARD.unit)
    logger.eval_line(3, pairs.metrics(), pairs.units)
    tokens = EvalResult(0.5, 320, 11, 0.25, {}, SFT.token_nll, SFT.unit)
    logger.eval_line(6, tokens.metrics(), tokens.units)
    logger.close()
    assert lines == ["eval step 3: loss 0.5000 rewards/accuracies 0.750 (32 pairs, 0.2s)",
                     f"eval step 6: loss 0.5000 ppl {math.exp(0.5):.3f} (320 tokens, 0.2s)"]
