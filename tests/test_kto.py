"""KTO (train.objective kto): tagged data, the KL rows, the loss against TRL's KTOTrainer, 2-rank exactness.

One 2-rank torchrun launch trains two cases (tests/workers/lora_cases.py, its `train` kind): full fine-tuning with
gradient accumulation and held-out examples on alpaca KTO records, and LoRA with unequal weights and the SFT term
on LLaMA-Factory's kto_en_demo layout (sharegpt `messages` + a `label` column). The oracle: a plain single-process
loop computing every row's log-probability with transformers directly and the loss with TRL 1.16's own code. TRL
1.16 has no `kto_loss` method any more: the loss, the KL estimate and its gather are inline in
`KTOTrainer._compute_loss`, which the oracle calls on a stand-in trainer (its attributes as that method reads them;
reference log-probabilities given as precomputed, the model wrapped to return TRL's `log_probs`), once per
micro-step on the micro-step's examples of both ranks (TRL's gathered mean of the two ranks' KL means is the mean
over them: the ranks hold as many examples).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from tests.helpers import LLAMA, cli_inproc, make_model_dir, read_metrics
from tests.reference import HYPER, STEPS, base_config, optimizer_and_schedule, row_logps_reference
from tests.test_bad_inputs import one_line_error
from tests.test_preference import LORA, alpaca_pairs, train_cases

KTO_SHAREGPT = {"file_name": "kto_en_demo.json", "formatting": "sharegpt",
                "columns": {"messages": "messages", "kto_tag": "label"},
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                         "assistant_tag": "assistant"}}  # LLaMA-Factory's dataset_info.json entry for kto_en_demo


def kto_alpaca(n: int = 32) -> list[dict]:
    """Sums answered right (desirable) or wrong (undesirable), the tags in no regular order."""
    out = []
    for i, rec in enumerate(alpaca_pairs(n)):
        good = (i * 5) % 7 < 4
        out.append({"instruction": rec["instruction"], "input": "",
                    "output": rec["chosen"] if good else rec["rejected"], "label": good})
    return out


def kto_sharegpt(n: int = 32) -> list[dict]:
    return [{"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}],
             "label": r["label"]} for r in kto_alpaca(n)]


def data_dir(root: Path) -> Path:
    d = root / "data"
    d.mkdir(exist_ok=True)
    (d / "kto_alpaca.json").write_text(json.dumps(kto_alpaca()))
    (d / "kto_en_demo.json").write_text(json.dumps(kto_sharegpt()))
    (d / "sft.json").write_text(json.dumps([{"instruction": "hi", "output": "hello"}] * 8))
    (d / "dataset_info.json").write_text(json.dumps({
        "kto_alpaca": {"file_name": "kto_alpaca.json", "columns": {"prompt": "instruction", "query": "input",
                                                                   "response": "output", "kto_tag": "label"}},
        "kto_en_demo": KTO_SHAREGPT,
        "sft": {"file_name": "sft.json"},
    }))
    return d


def kto_config(root: Path, name: str, model: Path, dataset: str = "kto_alpaca", pref: dict | None = None,
               **sections) -> dict:
    data = {"dataset_dir": str(root / "data"), "datasets": [dataset], "max_length": 64,
            "cache_dir": str(root / "cache")}
    cfg = base_config(root / name, model, data=data, **sections)
    cfg["train"]["objective"] = "kto"
    if pref:
        cfg["preference"] = pref
    return cfg


CASES = {  # (dataset, preference, extra sections)
    "full_accum": ("kto_alpaca", {}, {"train": {"micro_batch_size": 2, "grad_accum_steps": 2, "eval_every": 3,
                                                "eval_micro_batch_size": 3}}),
    "lora": ("kto_en_demo", {"beta": 0.2, "kto_chosen_weight": 1.0, "kto_rejected_weight": 1.5, "ftx": 0.3},
             {"finetune": {"method": "lora", "lora": LORA}}),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kto")
    llama = make_model_dir(root / "llama", LLAMA, seed=1)
    data_dir(root)
    train_cases(root, {name: kto_config(root, name, llama, dataset, pref, **sections)
                       for name, (dataset, pref, sections) in CASES.items()}, eval_data="kto_en_demo")
    return root, llama


# ----------------------------------------------------------------------------- the single-process TRL oracle


class LogProbs(torch.nn.Module):
    """A transformers model as TRL's KTOTrainer calls it (`fused_lm_head=True` -> per-token `log_probs`): each row
    runs alone, unpadded; `rows` keeps the last call's summed log-probability per row (with its graph)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.rows = model, None

    def forward(self, input_ids, attention_mask, labels, use_cache=False, fused_lm_head=True):
        width = input_ids.shape[1] - 1
        out = torch.zeros(input_ids.shape[0], width)
        sums = []
        for b in range(input_ids.shape[0]):
            n = int(attention_mask[b].sum())
            logits = self.model(input_ids=input_ids[b:b + 1, :n]).logits[0, :-1].float()
            target = labels[b, 1:n]
            mask = target != -100
            logps = logits.log_softmax(-1).gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1) * mask
            out = out.index_put((torch.full((n - 1,), b), torch.arange(n - 1)), logps)
            sums.append(logps.sum())
        self.rows = torch.stack(sums)
        zeros = torch.zeros_like(out)
        return SimpleNamespace(log_probs=out, entropy=zeros.detach(), mean_logits=zeros.detach())


def trl_batch(examples, ref_logps, ref_kl_logps) -> dict:
    """TRL's KTO batch (right-padded here: each row runs alone anyway) of fsdptrain's Feedback examples."""
    def rows(seqs):
        width = max(len(e.input_ids) for e in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        attn, completion = torch.zeros_like(ids), torch.zeros_like(ids)
        for b, e in enumerate(seqs):
            n = len(e.input_ids)
            ids[b, :n] = torch.tensor(e.input_ids)
            attn[b, :n] = 1
            completion[b, :n] = torch.tensor([int(x != -100) for x in e.labels])
        return ids, attn, completion

    ids, attn, completion = rows([e.example for e in examples])
    kl_ids, kl_attn, kl_completion = rows([e.kl for e in examples])
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": completion,
            "KL_input_ids": kl_ids, "KL_attention_mask": kl_attn, "KL_completion_mask": kl_completion,
            "label": torch.tensor([e.desirable for e in examples]), "ref_logps": ref_logps,
            "ref_KL_logps": ref_kl_logps}


def stand_in(policy: LogProbs, pref: dict):
    """The attributes KTOTrainer._compute_loss and _compute_kl_logps read (one process: gather is the identity)."""
    from trl import KTOTrainer

    me = SimpleNamespace(
        model=policy, beta=pref.get("beta", 0.1), loss_type="kto", calculate_KL=True, precompute_ref_logps=True,
        desirable_weight=pref.get("kto_chosen_weight", 1.0), undesirable_weight=pref.get("kto_rejected_weight", 1.0),
        aux_loss_enabled=False, _tp_size=1, _total_train_tokens=0, _metrics=defaultdict(lambda: defaultdict(list)),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t))
    me._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(me, model, batch)
    return me, lambda batch: KTOTrainer._compute_loss(me, policy, batch, False)


def kto_reference(policy, reference, examples, micro_steps: list[list[list[int]]], pref: dict) -> dict:
    """Per step: for each micro-step (its examples on both ranks), TRL's loss (the mean over the micro-step's
    examples) plus LLaMA-Factory's SFT term (pref_ftx x the desirable responses' mean token NLL summed / the
    micro-step's examples); the step's loss the mean over its micro-steps (Hugging Face's gradient accumulation);
    AdamW as reference_run. Returns the per-step loss, rewards/chosen, rewards/rejected and kl as fsdptrain logs
    them (means over the step's desirable / undesirable examples; kl weighted by examples)."""
    from trl import KTOTrainer  # noqa: F401  (the import is the check that TRL's KTO is there)

    wrapped = LogProbs(policy)
    me, trl_loss = stand_in(wrapped, pref)
    beta, ftx = pref.get("beta", 0.1), pref.get("ftx", 0.0)
    opt, factor = optimizer_and_schedule(policy, STEPS)
    out = {"loss": [], "rewards/chosen": [], "rewards/rejected": [], "kl": []}
    for s, step in enumerate(micro_steps):
        for g in opt.param_groups:
            g["lr"] = HYPER["lr"] * factor(s)
        total, sums, kls = 0.0, defaultdict(float), []
        for idx in step:
            batch = [examples[i] for i in idx]
            with torch.no_grad():
                if callable(reference) and not isinstance(reference, torch.nn.Module):
                    with reference():
                        ref = [(row_logps_reference(policy, e.example)[0], row_logps_reference(policy, e.kl)[0])
                               for e in batch]
                else:
                    ref = [(row_logps_reference(reference, e.example)[0], row_logps_reference(reference, e.kl)[0])
                           for e in batch]
            loss = trl_loss(trl_batch(batch, torch.stack([r for r, _ in ref]), torch.stack([k for _, k in ref])))
            logps, tags = wrapped.rows, [e.desirable for e in batch]
            if ftx:
                counts = torch.tensor([float(sum(x != -100 for x in e.example.labels)) for e in batch])
                nll = -(logps / counts)
                loss = loss + ftx * nll[torch.tensor(tags)].sum() / len(batch)
            total = total + loss / len(step)
            for e, r, lp in zip(batch, ref, logps.detach()):
                key = "chosen" if e.desirable else "rejected"
                sums[f"rewards/{key}"] += beta * (lp - r[0]).item()
                sums[key] += 1
            kls.append(me._metrics["train"]["kl"][-1] * len(batch))
        total.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), HYPER["clip"])
        opt.step()
        opt.zero_grad()
        out["loss"].append(total.item())
        out["rewards/chosen"].append(sums["rewards/chosen"] / sums["chosen"])
        out["rewards/rejected"].append(sums["rewards/rejected"] / sums["rejected"])
        out["kl"].append(sum(kls) / sum(len(idx) for idx in step))
    return out


def reference_for(root: Path, llama: Path, name: str) -> dict:
    """The oracle on the examples fsdptrain encoded (the same cache), the same micro-steps of both ranks."""
    from transformers import AutoModelForCausalLM

    from fsdptrain.config.schema import load_config
    from fsdptrain.data import pipeline
    from fsdptrain.data.loader import StepSampler
    from fsdptrain.data.tokenizer import load_tokenizer

    dataset, pref, sections = CASES[name]
    cfg = load_config(str(root / f"{name}.yaml"))
    tok = load_tokenizer(None, str(llama))
    examples = pipeline.load_examples(cfg, tok, log=lambda m: None)
    t = cfg.train
    samplers = [StepSampler(len(examples), 2, r, t.micro_batch_size, t.grad_accum_steps, cfg.seed) for r in (0, 1)]
    micro_steps = [[[i for sp in samplers for i in sp.rank_micro_batches(s)[k]] for k in range(t.grad_accum_steps)]
                   for s in range(STEPS)]
    if sections.get("finetune", {}).get("method") == "lora":
        from tests.test_finetune import peft_model

        policy = peft_model(llama, LORA, cfg.seed)
        reference = policy.disable_adapter
    else:
        policy = AutoModelForCausalLM.from_pretrained(str(llama), dtype=torch.float32)
        reference = AutoModelForCausalLM.from_pretrained(str(llama), dtype=torch.float32).eval()
    return kto_reference(policy, reference, examples, micro_steps, pref)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_two_rank_kto_matches_a_single_process_trl_reference(runs, name):
    root, llama = runs
    got = [m for m in read_metrics(root / name) if "loss" in m]
    ref = reference_for(root, llama, name)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    # within 1e-5, relative where a value is above 1 (fp32's rounding of differently ordered sums, amplified over
    # the steps by lr 5e-3); the KL, a mean of differences of summed log-probabilities, relative to those
    # (LoRA step 5: 3.11819 vs 3.11806 beside log-probabilities of -275 and -293)
    logps = [max(1.0, abs(m.get("logps/chosen", 0.0)), abs(m.get("logps/rejected", 0.0))) for m in got]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "kl"):
        mine = [m[key] for m in got]
        scales = logps if key == "kl" else [max(1.0, abs(b)) for b in ref[key]]
        assert all(abs(a - b) <= 1e-5 * s for a, b, s in zip(mine, ref[key], scales)), (key, mine, ref[key], scales)
    assert len({m["loss"] for m in got}) > 1  # it trains
    assert any(m["kl"] > 0 for m in got)  # the KL term is exercised (positive after some steps)


@pytest.mark.slow
def test_step_one_compares_the_policy_with_itself(runs):
    """Policy = reference at step 1: KL 0, every reward 0, and with unit weights the loss is exactly
    1 - sigmoid(0) = 0.5; the step's units are its 8 examples (2 ranks x 2 x 2 accumulation)."""
    root, _ = runs
    first = read_metrics(root / "full_accum")[0]
    assert first["loss"] == 0.5
    assert first["kl"] == first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    assert first["target_tokens"] == 8
    assert first["share/desirable"] + first["share/undesirable"] == 1.0


@pytest.mark.slow
def test_evaluation_on_held_out_examples_counts_each_once(runs):
    """32 held-out examples (kto_en_demo layout) dealt to 2 ranks in micro-batches of 3, the last round padded with
    empty examples: every example counted once, the rewards evaluated too."""
    root, _ = runs
    evals = [m for m in read_metrics(root / "full_accum") if "eval_loss" in m]
    assert [m["step"] for m in evals] == [3, 6]
    for m in evals:
        assert m["eval_tokens"] == 32
        assert 0.0 < m["eval_loss"] < 1.0 and m["eval_logps/chosen"] < 0 and m["eval_kl"] >= 0
        assert m["eval_share/desirable"] * 32 == sum(r["label"] for r in kto_sharegpt())


# ----------------------------------------------------------------------------- data


def test_kto_records_convert_from_alpaca_and_the_kto_en_demo_layout(tmp_path):
    from fsdptrain.data.formats import convert
    from fsdptrain.data.sources import read, resolve

    d = data_dir(tmp_path)
    alpaca, sharegpt = resolve(["kto_alpaca", "kto_en_demo"], str(d))
    assert alpaca.feedback and sharegpt.feedback
    a = convert(alpaca, *read(alpaca)).records
    s = convert(sharegpt, *read(sharegpt)).records
    assert a[1] == {"messages": [{"role": "user", "content": "add: 8+15"}],
                    "response": {"role": "assistant", "content": "25"}, "desirable": False, "tools": None}
    assert [(r["messages"], r["response"], r["desirable"]) for r in s] == \
        [(r["messages"], r["response"], r["desirable"]) for r in a]


def test_kl_rows_pair_each_prompt_with_the_previous_records_response(monkeypatch):
    """LLaMA-Factory's rule: the responses shifted by one within each preprocessing batch (of 1000 records), the
    first record of a batch taking the batch's last response; each row cut on its own."""
    from fsdptrain.data import formats
    from fsdptrain.data.encode import tokenize_record
    from fsdptrain.data.tokenizer import build_char_tokenizer

    def record(i: int) -> dict:
        return {"messages": [{"role": "user", "content": f"q{i}"}],
                "response": {"role": "assistant", "content": f"a{i}"}, "desirable": i % 2 == 0, "tools": None}

    records = [record(i) for i in range(5)]
    monkeypatch.setattr(formats, "KL_CHUNK", 3)
    formats.assign_kl_responses(records)
    assert [r["kl_response"]["content"] for r in records] == ["a2", "a0", "a1", "a4", "a3"]
    tok = build_char_tokenizer()
    (fb,), st = tokenize_record(tok, records[1], 64)
    head = tok.apply_chat_template(records[1]["messages"], tokenize=False, add_generation_prompt=True)
    assert tok.decode(fb.example.input_ids) == head + "a1<|im_end|>\n" and not fb.desirable
    assert tok.decode(fb.kl.input_ids) == head + "a0<|im_end|>\n"
    assert st.target_tokens == fb.example.n_targets == 4  # a, 1, <|im_end|>, newline: the KL row is no target


def test_kto_examples_are_collated_with_their_kl_rows_and_tags():
    from fsdptrain.data.encode import IGNORE, Example, Feedback
    from fsdptrain.data.evalset import rank_eval_batches
    from fsdptrain.data.loader import collate
    from fsdptrain.objectives.kto import examples_in

    fbs = [Feedback(Example([1, 2, 3 + i], [IGNORE, IGNORE, 3 + i]), Example([1, 2, 9, 9], [IGNORE, IGNORE, 9, 9]),
                    i == 1) for i in range(3)]
    b = collate(fbs[:2], pad_id=0)
    assert b["input_ids"][:, :4].tolist() == [[1, 2, 3, 0], [1, 2, 4, 0], [1, 2, 9, 9], [1, 2, 9, 9]]
    assert b["desirable"].tolist() == [False, True] and examples_in(b) == 2
    last = list(rank_eval_batches(fbs, 3, world_size=2, rank=1, micro_batch=1, pad_id=0))[-1]
    assert examples_in(collate(last, pad_id=0)) == 0


def test_a_class_mean_is_left_out_of_a_step_without_that_class():
    """rewards/chosen is a mean over the step's desirable examples (all ranks): none, and it is not logged."""
    from fsdptrain.config.schema import PreferenceConfig
    from fsdptrain.objectives.base import metric_means
    from fsdptrain.objectives.kto import kto_objective

    obj = kto_objective(PreferenceConfig(), lambda m: None)
    sums = {"rewards/chosen": 0.0, "rewards/rejected": -1.5, "kl": 0.4, "logps/chosen": 0.0,
            "logps/rejected": -30.0, "share/desirable": 0.0, "share/undesirable": 3.0}
    assert metric_means(obj, [sums[k] for k in obj.metrics], 3.0) == {
        "rewards/rejected": -0.5, "kl": 0.4 / 3, "logps/rejected": -10.0, "share/desirable": 0.0,
        "share/undesirable": 1.0}


def test_the_kto_loss_is_trls_on_a_micro_batch():
    """kto_losses and kl_estimate (one process) against TRL's _compute_loss on the same log-ratios, weights 2, 0.5."""
    from fsdptrain.config.schema import PreferenceConfig
    from fsdptrain.objectives.kto import kl_estimate, kto_losses

    p = PreferenceConfig(beta=0.3, kto_chosen_weight=2.0, kto_rejected_weight=0.5)
    own, kl_rows = torch.tensor([0.7, -1.2, 2.5, 0.1]), torch.tensor([0.9, 0.4, -0.2, 1.1])
    tags = torch.tensor([True, False, False, True])
    kl = kl_estimate(kl_rows, torch.ones(4, dtype=torch.bool))
    assert kl == kl_rows.mean().clamp(min=0)
    mine = kto_losses(p, own, tags, kl).mean()
    policy = SimpleNamespace(training=True)
    me, _ = stand_in(policy, {"beta": 0.3, "kto_chosen_weight": 2.0, "kto_rejected_weight": 0.5})
    # log-probs chosen so that policy - reference is `own` (rows) and `kl_rows` (KL rows)
    from trl import KTOTrainer

    def fake(rows):
        def model(**kw):
            width = kw["input_ids"].shape[1] - 1
            lp = torch.zeros(len(rows), width)
            lp[:, 0] = rows
            return SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp), mean_logits=torch.zeros_like(lp))
        return model

    ids = torch.ones(4, 3, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": ids, "completion_mask": ids, "KL_input_ids": ids,
             "KL_attention_mask": ids, "KL_completion_mask": ids, "label": tags, "ref_logps": torch.zeros(4),
             "ref_KL_logps": torch.zeros(4)}
    me._compute_kl_logps = lambda model, b: kl_rows
    theirs = KTOTrainer._compute_loss(me, fake(own), batch, False)
    assert torch.allclose(mine, theirs, atol=1e-7, rtol=0), (mine, theirs)
    negative = kl_estimate(-kl_rows.abs(), torch.ones(4, dtype=torch.bool))
    assert negative == 0.0  # clamped at 0, as TRL's


# ----------------------------------------------------------------------------- bad input, one line each


def write_cfg(tmp_path: Path, **overrides) -> Path:
    model = tmp_path / "llama"
    if not (model / "config.json").is_file():
        make_model_dir(model, {**LLAMA, "num_hidden_layers": 1})
    data_dir(tmp_path)
    cfg = kto_config(tmp_path, "run", model)
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        cfg.setdefault(section, {})[name] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("overrides, parts", [
    ({"preference__loss": "ipo"}, ["preference.loss belongs to train.objective dpo, not kto"]),
    ({"preference__simpo_gamma": 0.3}, ["preference.simpo_gamma belongs to train.objective dpo, not kto"]),
    ({"train__objective": "dpo", "preference__kto_rejected_weight": 2.0},
     ["preference.kto_rejected_weight belongs to train.objective kto, not dpo"]),
    ({"data__packing": True}, ["data.packing with train.objective kto: an example and its KL row must run in one "
                               "forward, unpacked; set data.packing=false"]),
    ({"train__objective": "sft", "preference__kto_chosen_weight": 2.0},
     ["preference.* is set but train.objective is sft"]),
])
def test_bad_kto_settings_are_one_line(tmp_path, overrides, parts):
    one_line_error(cli_inproc(["data", str(write_cfg(tmp_path, **overrides))]), *parts)


def test_bad_kto_data_is_one_line(tmp_path):
    path = write_cfg(tmp_path)
    one_line_error(cli_inproc(["data", str(path), "data.datasets=[sft]"]),
                   "data.datasets: data set 'sft' has no kto_tag column", "train.objective kto needs one")
    one_line_error(cli_inproc(["data", str(path), "train.objective=sft"]),
                   "data set 'kto_alpaca' is KTO data (a kto_tag column); train it with train.objective=kto")
    one_line_error(cli_inproc(["data", str(path), "data.datasets=[]"]), "train.objective kto needs KTO data")
    records = kto_alpaca(4)
    records[2]["label"] = "yes"
    (tmp_path / "data" / "kto_alpaca.json").write_text(json.dumps(records))
    one_line_error(cli_inproc(["data", str(path)]),
                   "data set 'kto_alpaca' (alpaca, kto): ", "kto_alpaca.json record 2: column 'label' holds \"yes\", "
                   "not a JSON bool (true: desirable, false: undesirable)")
    del records[2]["label"]
    (tmp_path / "data" / "kto_alpaca.json").write_text(json.dumps(records))
    one_line_error(cli_inproc(["data", str(path)]), "kto_alpaca.json record 2: missing column 'label' "
                                                   "(columns.kto_tag")


def test_data_command_shows_an_example_with_its_kl_row(tmp_path):
    proc = cli_inproc(["data", str(write_cfg(tmp_path)), "--show", "2"])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "--- example 1 undesirable (" in out and "--- example 1 KL row (" in out
    # kto_alpaca()[1] is "add: 8+15" answered 25; its KL row takes record 0's response, "3"
    assert "add: 8+15<|im_end|>\n<|im_start|>assistant\n[[25<|im_end|>\n]]" in out
    assert "add: 8+15<|im_end|>\n<|im_start|>assistant\n[[3<|im_end|>\n]]" in out
