"""Data pipeline, in process: LLaMA-Factory sources and formats, label masking read back as text,
cutoff rules, bad-input messages, the tokenised cache, packing parity, and the sampler.

The LLaMA-Factory fixtures are read in place from ../shared/data/llamafactory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fsdptrain.config.schema import Config
from fsdptrain.core.errors import ConfigError, UserError
from fsdptrain.data import cache, pipeline
from fsdptrain.data.encode import IGNORE, Example, build_example, tokenize_record
from fsdptrain.data.formats import convert
from fsdptrain.data.loader import StepSampler, collate, padded, resolve_rank_sizes, step_batches, to_device
from fsdptrain.data.packing import pack, pack_bins
from fsdptrain.data.sources import read, resolve
from fsdptrain.data.tokenizer import build_char_tokenizer
from tests.helpers import LLAMA, REPO, cli_inproc

LF = REPO.parent / "shared" / "data" / "llamafactory"
needs_fixtures = pytest.mark.skipif(not (LF / "dataset_info.json").is_file(),
                                    reason=f"LLaMA-Factory fixtures not found at {LF}")
END = "<|im_end|>\n"


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def target_runs(tok, ex: Example) -> list[str]:
    """The label-bearing tokens decoded, one string per contiguous run."""
    runs, cur = [], []
    for t, lab in enumerate(ex.labels):
        if lab != IGNORE and t > 0:
            assert lab == ex.input_ids[t]
            cur.append(lab)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def records_of(name_or_path, dataset_dir=LF):
    spec = resolve([name_or_path], str(dataset_dir))[0]
    rows, where = read(spec)
    return convert(spec, rows, where)


def write(path: Path, obj) -> Path:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


# ----------------------------------------------------------------------------- formats + masking


@needs_fixtures
def test_alpaca_single_turn_trains_exactly_the_response(tok):
    conv = records_of("identity")
    assert conv.read == 91 and len(conv.records) == 91
    raw = json.loads((LF / "identity.json").read_text())
    for rec, src in zip(conv.records[:10], raw):
        (ex,), st = tokenize_record(tok, rec, 2048)
        assert target_runs(tok, ex) == [src["output"] + END]
        assert tok.decode(ex.input_ids) == (f"<|im_start|>user\n{src['instruction']}{END}"
                                            f"<|im_start|>assistant\n{src['output']}{END}")
        assert st.target_tokens == len(src["output"]) + 2  # characters + <|im_end|> + newline


@needs_fixtures
def test_system_prompt_is_context_not_target(tok):
    conv = records_of("identity_openai_derived")  # registry entry from dataset_info.extra.json (sharegpt tags)
    assert len(conv.records) == 20
    raw = json.loads((LF / "identity_openai_derived.json").read_text())
    (ex,), _ = tokenize_record(tok, conv.records[0], 2048)
    msgs = raw[0]["messages"]
    assert tok.decode(ex.input_ids).startswith(f"<|im_start|>system\n{msgs[0]['content']}{END}<|im_start|>user\n")
    assert target_runs(tok, ex) == [msgs[2]["content"] + END]


def test_multi_turn_history_mask_history_and_train_on_prompt(tok, tmp_path):
    write(tmp_path / "chat.json", [{"instruction": "q2", "input": "ctx", "output": "a2", "system": "sys",
                                    "history": [["q0", "a0"], ["q1", "a1"]]}])
    write(tmp_path / "dataset_info.json", {"chat": {"file_name": "chat.json", "columns": {
        "prompt": "instruction", "query": "input", "response": "output", "system": "system", "history": "history"}}})
    (rec,) = records_of("chat", tmp_path).records
    (ex,), _ = tokenize_record(tok, rec, 2048)
    assert target_runs(tok, ex) == ["a0" + END, "a1" + END, "a2" + END]
    assert "<|im_start|>user\nq2\nctx" + END in tok.decode(ex.input_ids)  # instruction + "\n" + input
    (last,), _ = tokenize_record(tok, rec, 2048, mask_history=True)
    assert target_runs(tok, last) == ["a2" + END] and last.input_ids == ex.input_ids
    (everything,), _ = tokenize_record(tok, rec, 2048, train_on_prompt=True)
    assert everything.labels == everything.input_ids


def test_sharegpt_tool_calls_and_observations_are_turns(tok, tmp_path):
    tools = [{"name": "add", "description": "sum", "parameters": {"type": "object"}}]
    conv = [{"from": "human", "value": "2+3?"},
            {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": 2, "b": 3}})},
            {"from": "observation", "value": "5"},
            {"from": "gpt", "value": "It is 5."}]
    write(tmp_path / "tools.json", [{"conversations": conv, "tools": json.dumps(tools)}])
    write(tmp_path / "dataset_info.json", {"tc": {"file_name": "tools.json", "formatting": "sharegpt",
                                                  "columns": {"messages": "conversations", "tools": "tools"}}})
    (rec,) = records_of("tc", tmp_path).records
    (ex,), _ = tokenize_record(tok, rec, 2048)
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    assert target_runs(tok, ex) == [call + END, "It is 5." + END]
    text = tok.decode(ex.input_ids)
    assert f"<|im_start|>tool\n5{END}" in text and '# Tools\n{"type": "function", "function": {"name": "add"' in text


def test_openai_messages_with_tool_calls(tok, tmp_path):
    msgs = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "content": "rain"}, {"role": "assistant", "content": "Rain in Oslo."}]
    write(tmp_path / "oa.jsonl", json.dumps({"messages": msgs}) + "\n")
    (rec,) = records_of({"path": str(tmp_path / "oa.jsonl"), "formatting": "openai"}, tmp_path).records
    (ex,), _ = tokenize_record(tok, rec, 2048)
    call = '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert target_runs(tok, ex) == [call + END, "Rain in Oslo." + END]
    assert tok.decode(ex.input_ids).startswith(f"<|im_start|>system\nUse tools.{END}")


@needs_fixtures
@pytest.mark.parametrize("kind", ["parquet", "csv", "jsonl-folder", "save_to_disk"])
def test_other_file_types_read_the_same_records(tmp_path, kind):
    import datasets

    raw = json.loads((LF / "identity.json").read_text())
    ds = datasets.Dataset.from_list(raw)
    if kind == "parquet":
        ds.to_parquet(str(tmp_path / "id.parquet"))
        path = tmp_path / "id.parquet"
    elif kind == "csv":
        ds.to_csv(str(tmp_path / "id.csv"), index=False)
        path = tmp_path / "id.csv"
    elif kind == "jsonl-folder":
        path = tmp_path / "parts"
        path.mkdir()
        for k in range(3):
            write(path / f"part{k}.jsonl", "".join(json.dumps(r) + "\n" for r in raw[k::3]))
        raw = [r for k in range(3) for r in raw[k::3]]
    else:
        ds.save_to_disk(str(tmp_path / "saved"))
        path = tmp_path / "saved"
    conv = records_of(str(path), tmp_path)
    assert conv.read == 91
    assert [m["messages"][-1]["content"] for m in conv.records] == [r["output"] for r in raw]


def test_sharegpt_broken_role_order_is_skipped_and_counted_then_an_error_when_all_are(tmp_path):
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    swapped = {"conversations": [{"from": "gpt", "value": "yo"}, {"from": "human", "value": "hi"}]}
    dangling = {"conversations": [{"from": "human", "value": "hi"}]}
    write(tmp_path / "mixed.json", [good, swapped, good, dangling])
    write(tmp_path / "bad.json", [swapped, swapped])
    write(tmp_path / "dataset_info.json",
          {n: {"file_name": f"{n}.json", "formatting": "sharegpt"} for n in ("mixed", "bad")})
    conv = records_of("mixed", tmp_path)
    assert (conv.read, len(conv.records)) == (4, 2)
    assert conv.skipped == {"broken role order": 1, "does not end with an assistant turn": 1}
    with pytest.raises(UserError) as e:
        records_of("bad", tmp_path)
    assert str(e.value) == ("data set 'bad': all 2 records were skipped (2 broken role order); "
                            "check its formatting (sharegpt) and tags in dataset_info.json")


@needs_fixtures
def test_pretraining_text_is_chunked_and_every_token_trains(tok):
    conv = records_of("c4_demo")
    assert conv.read == 300 and set(conv.records[0]) == {"text"}
    text = json.loads((LF / "c4_demo.jsonl").read_text().split("\n")[0])["text"]
    n = len(tok(text)["input_ids"]) + 1  # + end of sequence
    examples, st = tokenize_record(tok, {"text": text}, n - 1)  # one token too many: a 1-token tail
    assert st.split == 1 and st.dropped_no_target == 1 and len(examples) == 1
    assert examples[0].labels == examples[0].input_ids and len(examples[0].input_ids) == n - 1


# ----------------------------------------------------------------------------- cutoff_len


def test_cutoff_keeps_a_short_response_and_the_end_of_a_long_prompt():
    prompt, response = list(range(100, 160)), list(range(10, 20))  # 60 prompt tokens, 10 response tokens
    ex, truncated = build_example([(prompt, False), (response, True)], max_length=32)
    assert truncated and len(ex.input_ids) == 32
    assert ex.input_ids == prompt[-22:] + response  # the prompt's end (turn header) stays next to the response
    assert [x for x in ex.labels if x != IGNORE] == response


def test_cutoff_keeps_a_short_prompt_and_cuts_a_long_response():
    prompt, response = list(range(100, 110)), list(range(200, 300))
    ex, _ = build_example([(prompt, False), (response, True)], max_length=40)
    assert ex.input_ids == prompt + response[:30]
    both, _ = build_example([(list(range(100, 150)), False), (response[:50], True)], max_length=40)
    assert both.input_ids == list(range(130, 150)) + response[:20]  # both long: shrink in proportion


def test_cutoff_with_mask_history_budgets_the_last_turn_first():
    segs = [([1] * 20, False), ([2] * 20, True), ([3] * 4, False), ([4] * 6, True)]
    ex, _ = build_example(segs, max_length=16, mask_history=True)
    # the last pair keeps all 10 tokens; the first shrinks to the 6 left, half prompt (its end), half response
    assert ex.input_ids == [1] * 3 + [2] * 3 + [3] * 4 + [4] * 6
    assert [x for x in ex.labels if x != IGNORE] == [4] * 6


# ----------------------------------------------------------------------------- bad input


@needs_fixtures
def test_unknown_data_set_lists_the_known_ones():
    known = sorted({**json.loads((LF / "dataset_info.json").read_text()),
                    **json.loads((LF / "dataset_info.extra.json").read_text())})
    with pytest.raises(UserError) as e:
        resolve(["identiy"], str(LF))
    assert str(e.value) == (f"data.datasets: unknown data set 'identiy' (not in {LF / 'dataset_info.json'} and no "
                            f"such file or folder); known: {', '.join(known)}")


@needs_fixtures
def test_missing_file_names_the_registry_entry():
    with pytest.raises(UserError) as e:
        resolve(["alpaca_en_demo"], str(LF))  # registered, but its file is not among the fixtures
    assert str(e.value) == (f"data set 'alpaca_en_demo': file {LF / 'alpaca_en_demo.json'} not found (file_name in "
                            f"{LF / 'dataset_info.json'}); check the path or data.dataset_dir")


def test_malformed_json_line_and_missing_column(tmp_path):
    write(tmp_path / "b.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction" "a"}\n')
    write(tmp_path / "m.json", [{"instruction": "a", "output": "b"}, {"instruction": "c", "answer": "d"}])
    write(tmp_path / "dataset_info.json", {"broken": {"file_name": "b.jsonl"}, "nocol": {"file_name": "m.json"}})
    with pytest.raises(UserError) as e:
        records_of("broken", tmp_path)
    assert str(e.value) == (f"data set 'broken': {tmp_path / 'b.jsonl'} line 3: malformed JSON (Expecting ':' "
                            "delimiter at column 16); fix or remove that line")
    with pytest.raises(UserError) as e:
        records_of("nocol", tmp_path)
    assert str(e.value) == (f"data set 'nocol' (alpaca): {tmp_path / 'm.json'} record 1: missing column 'output' "
                            "(columns.response; record has: instruction, answer); set columns in dataset_info.json")


@needs_fixtures
def test_cli_reports_a_data_error_in_one_line_with_exit_2(tmp_path):
    proc = cli_inproc(["train", f"output_dir={tmp_path / 'run'}", f"data.dataset_dir={LF}", "data.datasets=[nope]",
                       f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=1", "parallel.device=cpu"])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("fsdptrain: error: data.datasets: unknown data set 'nope' (not in ")
    assert "known: adgen_eval, " in lines[-1] and "Traceback" not in proc.stderr


def test_config_conflicts_are_reported():
    cfg = Config()
    cfg.data.token_budget, cfg.data.micro_batch_sizes = 4096, [2, 1]
    with pytest.raises(ConfigError, match="exclude each other"):
        pipeline.check(cfg)
    cfg.data.micro_batch_sizes, cfg.data.token_budget = [], 100
    with pytest.raises(ConfigError, match="below one padded example of 2048 tokens"):
        pipeline.check(cfg)
    with pytest.raises(UserError, match="3 entries, but the job has 4 ranks on 2 node"):
        resolve_rank_sizes([1, 2, 3], 4, 2)
    assert resolve_rank_sizes([4, 1], 4, 2) == [4, 4, 1, 1]


# ----------------------------------------------------------------------------- cache


@needs_fixtures
def test_cache_hit_on_second_run_and_miss_when_a_file_changes(tok, tmp_path, monkeypatch):
    shutil.copy(LF / "identity.json", tmp_path / "identity.json")
    write(tmp_path / "dataset_info.json", {"identity": {"file_name": "identity.json", "num_samples": 120}})
    specs = resolve(["identity", {"path": str(LF / "c4_demo.jsonl"), "num_samples": 7}], str(tmp_path))
    s = cache.Settings(max_length=64, train_on_prompt=False, mask_history=False, max_samples=None, seed=1)
    first, st, per_set, hit = cache.prepare(specs, tok, s, tmp_path / "c", 0, 0, False, lambda m: None)
    assert not hit
    assert [(p["name"], p["read"], p["kept"]) for p in per_set][0] == ("identity", 120, 120)  # 91 + 29 resampled
    assert per_set[1]["read"] == 7 and per_set[1]["kept"] == 7 + per_set[1]["split"]
    assert st.target_tokens == sum(first[i].n_targets for i in range(len(first)))

    def boom(*a, **k):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(cache, "_tokenize_batch", boom)
    again, st2, _, hit = cache.prepare(specs, tok, s, tmp_path / "c", 0, 0, False, lambda m: None)
    assert hit and again.path == first.path and st2 == st
    assert [again[i].input_ids for i in range(5)] == [first[i].input_ids for i in range(5)]
    with (tmp_path / "identity.json").open("a") as fh:
        fh.write("\n")  # same records, different bytes: a new key
    with pytest.raises(AssertionError, match="tokenised again"):
        cache.prepare(specs, tok, s, tmp_path / "c", 0, 0, False, lambda m: None)
    assert [p.name for p in (tmp_path / "c").iterdir()] == [first.path.name]  # the failed build left nothing


# ----------------------------------------------------------------------------- packing


def test_pack_bins_places_every_example_once_within_capacity():
    lengths = [5, 17, 3, 30, 12, 12, 1, 29, 8]
    bins = pack_bins(lengths, 32)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 32 for b in bins)
    assert len(bins) == 4 == -(-sum(lengths) // 32) and bins == pack_bins(lengths, 32)


def _tiny_model(attn: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(LLAMA)
    cfg = AutoConfig.for_model(fields.pop("model_type"), vocab_size=100, **fields)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32).eval()


def _per_token_losses(model, batch) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "n_tokens")}  # as the trainer passes them
    logits = model(**inputs, use_cache=False).logits
    losses = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE, reduction="none")
    return losses[batch["labels"].flatten() != IGNORE]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_the_per_token_losses_of_the_unpacked_examples(attn):
    g = torch.Generator().manual_seed(3)
    examples = []
    for n in (13, 7, 22, 9, 18):
        ids = torch.randint(4, 100, (n,), generator=g).tolist()
        examples.append(Example(ids, [IGNORE] * 3 + ids[3:]))
    packed = pack(examples, [len(e.input_ids) for e in examples], 40)
    assert len(packed) == 2 and all(packed[i].seq_lens for i in range(2))
    model = _tiny_model(attn)
    with torch.no_grad():
        rows = [packed[i] for i in range(len(packed))]
        got = _per_token_losses(model, collate(rows, 0))
        flat = _per_token_losses(model, collate(rows, 0, flatten=True))
        want = torch.cat([_per_token_losses(model, collate([e], 0))
                          for i in range(len(packed)) for e in packed.unpacked(i)])
        leaky = collate(rows, 0)
        leaky.pop("position_ids")  # control: without restarting positions the examples see each other
        leaked = _per_token_losses(model, leaky)
    assert got.numel() == want.numel() == sum(e.n_targets for e in examples)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert torch.allclose(flat, want, atol=1e-5, rtol=0)
    assert (leaked - want).abs().max() > 1e-3


def test_flattened_rows_carry_flash_attentions_boundaries_as_transformers_collator_gives_them():
    """collate(flatten=True) gives flash attention's varlen kwargs (DataCollatorWithFlattening's contract with
    return_flash_attn_kwargs=True), so transformers uses them instead of deriving them from position_ids on the GPU
    in every layer: the same values as that collator on the same sequences, and as transformers' own derivation."""
    from transformers import DataCollatorWithFlattening
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    g = torch.Generator().manual_seed(5)
    examples = [Example(ids, ids) for ids in (torch.randint(4, 100, (n,), generator=g).tolist()
                                              for n in (13, 7, 22, 9, 18, 30))]
    packed = pack(examples, [len(e.input_ids) for e in examples], 40)
    rows = [packed[i] for i in range(len(packed))] + [examples[1]]  # packed rows and an unpacked one
    batch = collate(rows, 0, flatten=True)
    width = batch["input_ids"].shape[1] // len(rows)
    # the same sequences for transformers' collator: each row's examples, then its padding tail
    seqs = []
    for r, e in enumerate(rows):
        at = r * width
        for n in (e.seq_lens or [len(e.input_ids)]) + [width - len(e.input_ids)]:
            if n:
                seqs.append({"input_ids": batch["input_ids"][0, at:at + n].tolist()})
                at += n
    theirs = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(seqs)
    assert torch.equal(theirs["input_ids"], batch["input_ids"]) and torch.equal(theirs["position_ids"],
                                                                                batch["position_ids"])
    for k in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert batch[k].dtype == theirs[k].dtype == torch.int32 and torch.equal(batch[k], theirs[k])
    for k in ("max_length_q", "max_length_k"):
        assert type(batch[k]) is int and batch[k] == theirs[k] == max(len(x["input_ids"]) for x in seqs)
    (cu, _), (longest, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])  # per layer, on the GPU
    assert torch.equal(cu, batch["cu_seq_lens_q"]) and int(longest) == batch["max_length_q"]
    moved = to_device(batch, torch.device("cpu"))  # the trainer's and evaluation's move keeps the ints
    assert moved["max_length_q"] == batch["max_length_q"] and "n_tokens" not in moved and "cu_seq_lens_k" in moved
    assert "cu_seq_lens_q" not in collate(rows, 0)  # only the flattened rows (flash attention's) carry them
    from fsdptrain.trainer import longest_sequence  # MFU's attention context: a sequence, not the flattened row

    assert longest_sequence(batch) == batch["max_length_q"] and longest_sequence(collate(rows, 0)) == width


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention varlen packing needs a CUDA GPU")
def test_flash_attention_packed_rows_match_unpacked_on_gpu():
    pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(LLAMA)
    cfg = AutoConfig.for_model(fields.pop("model_type"), vocab_size=100, **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="flash_attention_2", dtype=torch.bfloat16)
    model = model.cuda().eval()
    g = torch.Generator().manual_seed(3)
    examples = [Example(ids, ids) for ids in (torch.randint(4, 100, (n,), generator=g).tolist() for n in (13, 22, 9))]
    packed = pack(examples, [len(e.input_ids) for e in examples], 48)

    def losses(batch):
        return _per_token_losses(model, {**to_device(batch, torch.device("cuda")), "labels": batch["labels"].cuda()}
                                 ).float()

    with torch.no_grad():
        got = losses(collate([packed[i] for i in range(len(packed))], 0, flatten=True))
        want = torch.cat([losses(collate([e], 0)) for i in range(len(packed)) for e in packed.unpacked(i)])
    assert torch.allclose(got, want, atol=3e-2, rtol=0), (got - want).abs().max()  # bf16 kernels


# ----------------------------------------------------------------------------- sampler


def test_sampler_ranks_are_disjoint_and_uneven_sizes_keep_the_global_batch():
    one = StepSampler(50, 1, 0, 8, 2, seed=5)
    ranks = [StepSampler(50, 2, r, 1, 2, seed=5, rank_batch_sizes=[6, 2]) for r in range(2)]
    assert one.steps_per_epoch == ranks[0].steps_per_epoch == 3
    seen = []
    for step in range(3):
        parts = [s.rank_micro_batches(step) for s in ranks]
        assert [len(p) for p in parts] == [2, 2]  # same number of micro-steps on every rank
        assert [len(mb) for mb in parts[0]] == [6, 6] and [len(mb) for mb in parts[1]] == [2, 2]
        flat = [i for p in parts for mb in p for i in mb]
        assert flat == one.global_indices(step) and len(set(flat)) == 16
        seen += flat
    assert len(set(seen)) == 48  # disjoint across the epoch's steps; the last 2 examples are dropped
    assert one.global_indices(3) == one.permutation(1)[:16]  # next epoch, new order


def test_token_budget_micro_batches_stay_within_budget_and_cover_the_epoch():
    lengths = [(7 * i) % 61 + 3 for i in range(200)]
    samplers = [StepSampler(200, 2, r, 1, 3, seed=1, token_budget=128, lengths=lengths) for r in range(2)]
    steps = samplers[0].steps_per_epoch
    seen = []
    for step in range(steps):
        mbs = [mb for s in samplers for mb in s.rank_micro_batches(step)]
        assert len(mbs) == 6
        for mb in mbs:
            assert padded(max(lengths[i] for i in mb)) * len(mb) <= 128
        seen += [i for mb in mbs for i in mb]
    plan = samplers[0]._plan(0)
    assert len(seen) == len(set(seen)) == sum(len(mb) for mb in plan[: steps * 6])


def test_token_budget_fills_micro_batches_and_balances_ranks():
    import random

    rng = random.Random(0)
    lengths = [min(2048, int(rng.lognormvariate(5.5, 0.8)) + 8) for _ in range(6000)]
    samplers = [StepSampler(len(lengths), 4, r, 1, 2, seed=1, token_budget=8192, lengths=lengths) for r in range(4)]
    fills, ratios = [], []
    for step in range(40):
        per_rank = [[sum(lengths[i] for i in mb) for mb in s.rank_micro_batches(step)] for s in samplers]
        fills += [t / 8192 for r in per_rank for t in r]
        ratios.append(min(map(sum, per_rank)) / max(map(sum, per_rank)))
    # length-sorted windows: real tokens near the budget (unsorted greedy cutting gives about 0.37 here)
    assert sum(fills) / len(fills) > 0.85
    assert sum(ratios) / len(ratios) > 0.85


@pytest.mark.parametrize("budget", [None, 100])
def test_sampler_state_resumes_the_exact_batches(budget):
    lengths = [(5 * i) % 40 + 2 for i in range(37)]
    kw = dict(seed=9, token_budget=budget, lengths=lengths if budget else None)
    full = StepSampler(37, 2, 1, 2, 2, **kw)
    expected = [full.rank_micro_batches(s) for s in range(12)]  # crosses several epochs
    first = StepSampler(37, 2, 1, 2, 2, **kw)
    for s in range(5):
        first.rank_micro_batches(s)
        first.step = s + 1
    state = json.loads(json.dumps(first.state_dict()))
    assert state["step"] == 5
    if budget is None:
        assert (state["epoch"], state["position"]) == (1, 8)  # 4 steps of 8 per epoch: step 5 is epoch 1's second
    resumed = StepSampler(37, 2, 1, 2, 2, **kw)
    resumed.load_state_dict(state)
    assert [resumed.rank_micro_batches(s) for s in range(resumed.step, 12)] == expected[5:]
    with pytest.raises(UserError, match="n_examples 37 -> 38"):
        StepSampler(38, 2, 1, 2, 2, seed=9, token_budget=budget, lengths=lengths + [3] if budget else None) \
            .load_state_dict(state)


def test_dataloader_workers_give_the_same_batches_in_order():
    examples = [Example(list(range(4, 4 + n)), list(range(4, 4 + n))) for n in range(5, 45)]
    sampler = StepSampler(len(examples), 1, 0, 3, 2, seed=2)
    plain = list(step_batches(sampler, examples, 0, 2, 8))
    workers = list(step_batches(sampler, examples, 0, 2, 8, num_workers=2))
    assert len(plain) == len(workers) == 6
    for a, b in zip(plain, workers):
        assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


@needs_fixtures
def test_pipeline_logs_counts_and_packs(tmp_path):
    tok = build_char_tokenizer()
    cfg = Config()
    cfg.data.dataset_dir, cfg.data.datasets = str(LF), ["identity", {"name": "c4_demo", "num_samples": 20}]
    cfg.data.max_length, cfg.data.cache_dir, cfg.data.packing = 128, str(tmp_path), True
    lines: list[str] = []
    rows = pipeline.load_examples(cfg, tok, log=lines.append)
    text = "\n".join(lines)
    long = sum(len(tokenize_record(tok, r, 10_000)[0][0].input_ids) > 128 for r in records_of("identity").records)
    assert long > 0
    assert f"data: 'identity': read 91, skipped 0 (none), kept 91, truncated {long}, dropped (no target token " \
           "left) 0" in text
    total = next(x for x in lines if x.startswith("data: total:"))
    assert total.startswith(f"data: total: read 111, skipped 0 (none), kept {len(rows.base)} examples, "
                            f"truncated {long}")
    assert total.endswith(f"target tokens {sum(rows.base[i].n_targets for i in range(len(rows.base)))}")
    assert sorted(i for b in rows.bins for i in b) == list(range(len(rows.base)))
    assert f"packed {len(rows.base)} examples into {len(rows)} rows of 128 tokens" in text
    assert all(len(rows[i].input_ids) <= 128 for i in range(len(rows)))
    lines.clear()
    pipeline.load_examples(cfg, tok, log=lines.append)
    assert any(x.startswith("data: cache hit") for x in lines)


@needs_fixtures
@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_masking_with_a_byte_level_bpe_tokenizer(template):
    """A subword tokenizer (trained here: no hub) with each built-in template: the same text-level guarantee."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from fsdptrain.data.tokenizer import apply_template

    raw = json.loads((LF / "identity.json").read_text())
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>"]
    core.train_from_iterator([r["instruction"] + " " + r["output"] for r in raw],
                             trainers.BpeTrainer(vocab_size=500, special_tokens=specials,
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", bos_token="<|begin_of_text|>")
    apply_template(bpe, template)
    end = END if template == "chatml" else "<|eot_id|>"
    for r in raw[:30]:
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": r["instruction"]},
                {"role": "assistant", "content": r["output"]}, {"role": "user", "content": "again?"},
                {"role": "assistant", "content": "Yes, " + r["output"]}]
        (ex,), _ = tokenize_record(bpe, {"messages": msgs}, 4096)
        assert target_runs(bpe, ex) == [r["output"] + end, "Yes, " + r["output"] + end]
        assert ex.input_ids == bpe.apply_chat_template(msgs, tokenize=True, return_dict=False)
