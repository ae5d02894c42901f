"""Preference training (train.objective dpo): pair data, the dpo losses, the reference model, 2-rank exactness.

One 2-rank torchrun launch trains every case (tests/workers/lora_cases.py, its generic `train` kind). The
oracle: a plain single-process loop (tests/reference.py preference_reference) computing each row's log-probability
with transformers directly and the loss with TRL's own code (CPOTrainer.cpo_loss on the log-ratios: DPO's
sigmoid with label smoothing, hinge, ipo, simpo; ORPOTrainer.odds_ratio_loss); the reference model there is a
second transformers model (full, freeze) or peft's disable_adapter (LoRA).
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import LLAMA, REPO, cli_inproc, make_model_dir, read_metrics, torchrun
from tests.reference import STEPS, base_config, preference_reference
from tests.test_bad_inputs import one_line_error

LF_CANDIDATES = [REPO.parent / "shared" / "data" / "llamafactory", REPO.parents[1] / "shared" / "data" / "llamafactory"]
LF = next((p for p in LF_CANDIDATES if (p / "dataset_info.json").is_file()), LF_CANDIDATES[0])
needs_fixtures = pytest.mark.skipif(not (LF / "dpo_zh_demo.json").is_file(), reason=f"fixtures not found at {LF}")
LN2 = float(torch.tensor(math.log(2), dtype=torch.float32))
LORA = {"rank": 8, "alpha": 16, "target": "all"}


def alpaca_pairs(n: int = 32) -> list[dict]:
    """Sums with the right answer chosen and a wrong, sometimes long-winded one rejected."""
    out = []
    for i in range(n):
        a, b = 7 * i % 50 + 1, 13 * i % 40 + 2
        wrong = f"{a + b + 1 + i % 3}" if i % 2 else f"I think it is about {a + b - 2}, give or take"
        out.append({"instruction": f"add: {a}+{b}", "input": "", "chosen": str(a + b), "rejected": wrong})
    return out


def sharegpt_pairs(n: int = 32) -> list[dict]:
    out = []
    for rec in alpaca_pairs(n):
        out.append({"conversations": [{"from": "system", "value": "Answer with a number."},
                                      {"from": "human", "value": rec["instruction"]}],
                    "chosen": {"from": "gpt", "value": rec["chosen"]},
                    "rejected": {"from": "gpt", "value": rec["rejected"]}})
    return out


def data_dir(root: Path) -> Path:
    d = root / "data"
    d.mkdir(exist_ok=True)
    (d / "alpaca_pairs.json").write_text(json.dumps(alpaca_pairs()))
    (d / "sharegpt_pairs.json").write_text(json.dumps(sharegpt_pairs()))
    (d / "sft.json").write_text(json.dumps([{"instruction": "hi", "output": "hello"}] * 8))
    (d / "dataset_info.json").write_text(json.dumps({
        "alpaca_pairs": {"file_name": "alpaca_pairs.json", "ranking": True},
        "sharegpt_pairs": {"file_name": "sharegpt_pairs.json", "ranking": True, "formatting": "sharegpt",
                           "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
        "sft": {"file_name": "sft.json"},
    }))
    return d


def dpo_config(root: Path, name: str, model: Path, dataset: str = "alpaca_pairs", pref: dict | None = None,
               **sections) -> dict:
    data = {"dataset_dir": str(root / "data"), "datasets": [dataset], "max_length": 64,
            "cache_dir": str(root / "cache")}
    cfg = base_config(root / name, model, data=data, **sections)
    cfg["train"]["objective"] = "dpo"
    if pref:
        cfg["preference"] = pref
    return cfg


# (dataset, preference, extra sections): grad accumulation on the plain sigmoid (step 1 is ln 2 exactly),
# LoRA with label smoothing and the SFT term on sharegpt pairs (step 1: policy = reference too), freeze with
# hinge, and the per-token losses
CASES = {
    "sigmoid_full_accum": ("alpaca_pairs", {}, {"train": {"micro_batch_size": 1, "grad_accum_steps": 2,
                                                          "eval_every": 3, "eval_micro_batch_size": 3}}),
    "sigmoid_lora": ("sharegpt_pairs", {"label_smoothing": 0.1, "ftx": 0.5},
                     {"finetune": {"method": "lora", "lora": LORA}}),
    "hinge_freeze": ("alpaca_pairs", {"loss": "hinge", "beta": 0.05},
                     {"finetune": {"method": "freeze", "freeze": {"trainable_layers": 1}}}),
    "ipo_full": ("alpaca_pairs", {"loss": "ipo", "beta": 0.5}, {}),
    "orpo_full": ("alpaca_pairs", {"loss": "orpo", "beta": 0.2}, {}),
    "simpo_lora": ("sharegpt_pairs", {"loss": "simpo", "beta": 2.0, "simpo_gamma": 0.3},
                   {"finetune": {"method": "lora", "lora": LORA}}),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("preference")
    llama = make_model_dir(root / "llama", LLAMA, seed=1)
    data_dir(root)
    proc = train_cases(root, {name: dpo_config(root, name, llama, dataset, pref, **sections)
                              for name, (dataset, pref, sections) in CASES.items()}, eval_data="sharegpt_pairs")
    (root / "stdout.txt").write_text(proc.stdout)
    return root, llama


def train_cases(root: Path, configs: dict[str, dict], eval_data: str) -> subprocess.CompletedProcess:
    """Train every config in one 2-rank launch (tests/workers/lora_cases); a config with train.eval_every
    evaluates on held-out items of `eval_data`, another data set, so that its training data stays the same."""
    spec = {"cases": []}
    for name, cfg in configs.items():
        if "eval_every" in cfg["train"]:
            cfg["data"]["eval_datasets"] = [eval_data]
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        spec["cases"].append({"config": str(path), "kind": "train"})
    (root / "spec.json").write_text(json.dumps(spec))
    proc = torchrun(2, ["-m", "tests.workers.lora_cases", str(root / "spec.json")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def reference_for(root: Path, llama: Path, name: str) -> dict:
    """The single-process loop on the pairs fsdptrain encoded (the same cache), the same global batches."""
    from transformers import AutoModelForCausalLM

    from fsdptrain.config.schema import load_config
    from fsdptrain.data import pipeline
    from fsdptrain.data.loader import StepSampler
    from fsdptrain.data.tokenizer import load_tokenizer

    dataset, pref, sections = CASES[name]
    cfg = load_config(str(root / f"{name}.yaml"))
    tok = load_tokenizer(None, str(llama))
    pairs = pipeline.load_examples(cfg, tok, log=lambda m: None)
    sampler = StepSampler(len(pairs), world_size=1, rank=0, micro_batch_size=4, grad_accum_steps=1, seed=7)
    batches = [sampler.global_indices(s) for s in range(STEPS)]
    method = sections.get("finetune", {}).get("method", "full")
    if method == "lora":
        from tests.test_finetune import peft_model

        policy = peft_model(llama, LORA, cfg.seed)
        reference = policy.disable_adapter
    else:
        policy = AutoModelForCausalLM.from_pretrained(str(llama), dtype=torch.float32)
        reference = AutoModelForCausalLM.from_pretrained(str(llama), dtype=torch.float32).eval()
        if method == "freeze":  # the last block trains (trainable_layers 1, all its modules)
            for n, p in policy.named_parameters():
                p.requires_grad_(n.startswith(f"model.layers.{LLAMA['num_hidden_layers'] - 1}."))
    return preference_reference(policy, reference, pairs, batches, pref)


QUICK = ("sigmoid_full_accum", "sigmoid_lora")  # the other losses' references take ~15 s each: slow


@pytest.mark.parametrize("name", [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow) for n in CASES])
def test_two_rank_dpo_matches_a_single_process_trl_reference(runs, name):
    root, llama = runs
    got = read_metrics(root / name)
    ref = reference_for(root, llama, name)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    # within 1e-5, relative where a loss or metric is above 1 (ipo's squared loss reaches 10 here, log-probs
    # -300: fp32's rounding of a differently ordered sum, amplified over the steps by lr 5e-3)
    for key in ("loss", "rewards/chosen", "rewards/accuracies", "logps/rejected"):
        mine = [m[key] for m in got]
        assert all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for a, b in zip(mine, ref[key])), (key, mine, ref[key])
    losses = [m["loss"] for m in got]
    assert len(set(losses)) > 1  # it trains: not the starting loss six times


@pytest.mark.parametrize("name", ["sigmoid_full_accum", "hinge_freeze"])
def test_step_one_compares_the_policy_with_itself(runs, name):
    """Policy = reference at step 1: the sigmoid DPO loss is exactly ln 2 (hinge: exactly 1), every reward 0."""
    root, _ = runs
    first = read_metrics(root / name)[0]
    assert first["loss"] == (LN2 if name.startswith("sigmoid") else 1.0)
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0.0
    assert first["target_tokens"] == 4  # the step's units: 4 pairs (2 ranks x 1 x 2 accumulation, or 2 x 2 x 1)


def test_evaluation_on_held_out_pairs_counts_each_pair_once(runs):
    """32 eval pairs dealt to 2 ranks in micro-batches of 3 (the last round padded with empty pairs): every pair
    counted once; the rewards and accuracy are evaluated too."""
    root, _ = runs
    evals = [m for m in read_metrics(root / "sigmoid_full_accum") if "eval_loss" in m]
    assert [m["step"] for m in evals] == [3, 6]
    for m in evals:
        assert m["eval_tokens"] == 32
        assert 0.0 <= m["eval_rewards/accuracies"] <= 1.0 and m["eval_rewards/accuracies"] * 32 % 1 == 0
        assert math.isfinite(m["eval_loss"]) and m["eval_logps/chosen"] < 0


def test_lora_reference_is_the_base_with_adapters_off(runs):
    """LoRA: step 1's rewards are exactly 0 although label smoothing and the SFT term move the loss."""
    root, _ = runs
    first = read_metrics(root / "sigmoid_lora")[0]
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    assert first["loss"] != LN2


# ----------------------------------------------------------------------------- pair data


def test_pairs_convert_from_alpaca_and_sharegpt_ranking_records(tmp_path):
    from fsdptrain.data.formats import convert
    from fsdptrain.data.sources import read, resolve

    d = data_dir(tmp_path)
    alpaca, sharegpt = resolve(["alpaca_pairs", "sharegpt_pairs"], str(d))
    a = convert(alpaca, *read(alpaca)).records[1]
    assert a == {"messages": [{"role": "user", "content": "add: 8+15"}],
                 "chosen": {"role": "assistant", "content": "23"},
                 "rejected": {"role": "assistant", "content": "25"}, "tools": None}
    s = convert(sharegpt, *read(sharegpt)).records[1]
    assert s["messages"] == [{"role": "system", "content": "Answer with a number."}, a["messages"][0]]
    assert (s["chosen"], s["rejected"]) == (a["chosen"], a["rejected"])


@needs_fixtures
def test_llamafactory_dpo_demo_converts_every_record():
    from fsdptrain.data.formats import convert
    from fsdptrain.data.sources import read, resolve

    spec, = resolve(["dpo_zh_demo"], str(LF))
    assert spec.ranking
    conv = convert(spec, *read(spec))
    assert (conv.read, conv.skipped, len(conv.records)) == (300, {}, 300)
    rec = conv.records[0]
    assert rec["messages"][-1]["role"] == "user" and rec["chosen"]["role"] == "assistant"
    assert rec["chosen"]["content"] != rec["rejected"]["content"]


def test_a_pair_shares_its_prompt_and_is_cut_by_the_infer_seqlen_rule():
    from fsdptrain.data.encode import IGNORE, PairError, infer_lengths, tokenize_pair
    from fsdptrain.data.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    prompt = [{"role": "user", "content": "What is 2+2?"}]
    pair, cut = tokenize_pair(tok, prompt, {"role": "assistant", "content": "4"},
                              {"role": "assistant", "content": "five"}, 64)
    head = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    for row, reply in ((pair.chosen, "4"), (pair.rejected, "five")):
        assert tok.decode(row.input_ids) == head + reply + "<|im_end|>\n"
        n = len(tok(head, add_special_tokens=False)["input_ids"])
        assert row.labels[:n] == [IGNORE] * n and IGNORE not in row.labels[n:]
    assert not cut
    # long: a prompt and the longer reply each over half of 80 tokens -> cut in proportion, the same cut for both
    # replies, and the prompt keeps its end (the turn header)
    long = "no " * 67 + "x"
    pair, cut = tokenize_pair(tok, [{"role": "system", "content": "Be brief."}, *prompt],
                              {"role": "assistant", "content": "4"}, {"role": "assistant", "content": long}, 80)
    full = tok(tok.apply_chat_template([{"role": "system", "content": "Be brief."}, *prompt], tokenize=False,
                                       add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    ns, nt = infer_lengths(len(full), len(long) + 2, 80)
    assert 2 * len(full) >= 80 and 0 < ns < len(full)
    assert cut and len(pair.rejected.input_ids) == ns + nt == 80
    assert len(pair.chosen.input_ids) == ns + 3  # "4<|im_end|>\n" is shorter than the cut
    assert pair.chosen.input_ids[:ns] == pair.rejected.input_ids[:ns] == full[-ns:]
    with pytest.raises(PairError, match="would cut the prompt away entirely"):
        tokenize_pair(tok, [{"role": "user", "content": "y" * 100}], {"role": "assistant", "content": "z" * 100},
                      {"role": "assistant", "content": "w" * 100}, 20)


def test_pairs_are_dealt_whole_and_collated_chosen_then_rejected():
    from fsdptrain.data.encode import IGNORE, Example, Pair
    from fsdptrain.data.evalset import rank_eval_batches
    from fsdptrain.data.loader import StepSampler, collate
    from fsdptrain.objectives.preference import pairs_in

    pairs = [Pair(Example([1, 2, 3 + i], [IGNORE, IGNORE, 3 + i]), Example([1, 2, 9, 9], [IGNORE, IGNORE, 9, 9]))
             for i in range(3)]
    b = collate(pairs[:2], pad_id=0)
    assert b["input_ids"][:, :4].tolist() == [[1, 2, 3, 0], [1, 2, 4, 0], [1, 2, 9, 9], [1, 2, 9, 9]]
    assert b["labels"][:, :3].tolist() == [[IGNORE, 3, IGNORE], [IGNORE, 4, IGNORE], [IGNORE, 9, 9], [IGNORE, 9, 9]]
    assert pairs_in(b) == 2 and int(b["n_tokens"]) == 14
    # eval: the filler of the last round is a pair without responses, counted as none
    last = list(rank_eval_batches(pairs, 3, world_size=2, rank=1, micro_batch=1, pad_id=0))[-1]
    assert pairs_in(collate(last, pad_id=0)) == 0
    # a token budget costs a pair two padded rows: 2 x 8 x 2 pairs fit 32 tokens, a third does not
    s = StepSampler(3, 1, 0, 1, 1, seed=0, token_budget=32, lengths=[3, 4, 4], rows_per_item=2, shuffle=False)
    assert sorted(len(mb) for mb in s._plan(0)) == [1, 2]


# ----------------------------------------------------------------------------- bad input, one line each


def write_cfg(tmp_path: Path, make_config=None, **overrides) -> Path:
    """A one-layer model folder, the pair data sets and `make_config(tmp_path, "run", model)` (default the dpo
    config) with `section__key=value` overrides, written to tmp_path/cfg.yaml (test_reward.py uses it too)."""
    model = tmp_path / "llama"
    if not (model / "config.json").is_file():
        make_model_dir(model, {**LLAMA, "num_hidden_layers": 1})
    data_dir(tmp_path)
    cfg = (make_config or dpo_config)(tmp_path, "run", model)
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        cfg.setdefault(section, {})[name] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("overrides, parts", [
    ({"preference__simpo_gamma": 0.3}, ["preference.simpo_gamma belongs to the simpo loss, not sigmoid"]),
    ({"preference__loss": "ipo", "preference__label_smoothing": 0.1},
     ["preference.label_smoothing belongs to the sigmoid loss, not ipo"]),
    ({"data__packing": True}, ["data.packing with train.objective dpo", "set data.packing=false"]),
    ({"train__loss_chunk_tokens": 64}, ["train.loss_chunk_tokens with train.objective dpo"]),
    ({"train__objective": "sft", "preference__beta": 0.2},
     ["preference.* is set but train.objective is sft"]),
])
def test_bad_preference_settings_are_one_line(tmp_path, overrides, parts):
    one_line_error(cli_inproc(["data", str(write_cfg(tmp_path, **overrides))]), *parts)


def test_bad_preference_data_is_one_line(tmp_path):
    path = write_cfg(tmp_path)
    one_line_error(cli_inproc(["data", str(path), "data.datasets=[sft]"]),
                   "data set 'sft' is not preference data (no `ranking: true`")
    one_line_error(cli_inproc(["data", str(path), "train.objective=sft"]),
                   "data set 'alpaca_pairs' holds preference pairs (ranking: true); train it with "
                   "train.objective=dpo")
    records = alpaca_pairs(4)
    del records[2]["rejected"]
    (tmp_path / "data" / "alpaca_pairs.json").write_text(json.dumps(records))
    one_line_error(cli_inproc(["data", str(path)]), "alpaca_pairs.json record 2: missing column 'rejected' "
                                                    "(columns.rejected")
    (tmp_path / "data" / "alpaca_pairs.json").write_text(json.dumps([{
        "instruction": "q" * 200, "input": "", "chosen": "a" * 200, "rejected": "b" * 200}]))
    one_line_error(cli_inproc(["data", str(path), "data.max_length=20"]),
                   "record 0: truncation to data.max_length 20 would cut the prompt away entirely")
    one_line_error(cli_inproc(["data", str(path), "data.datasets=[]"]),
                   "train.objective dpo needs preference data")


def test_data_command_shows_a_pair_with_both_responses_marked(tmp_path):
    proc = cli_inproc(["data", str(write_cfg(tmp_path)), "--show", "1"])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "--- pair 0 chosen (" in out and "--- pair 0 rejected (" in out
    assert "add: 1+2<|im_end|>\n<|im_start|>assistant\n[[3<|im_end|>\n]]" in out  # alpaca_pairs()[0]
    assert "<|im_start|>assistant\n[[I think it is about 1, give or take<|im_end|>\n]]" in out
