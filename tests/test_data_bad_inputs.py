"""Bad data inputs end in one line naming the file; unusable records are counted, not trained; the work per
record is bounded by max_length (memory measured in a subprocess), with the same tokens as tokenising everything.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from fsdptrain.core.errors import UserError
from fsdptrain.data.sources import read, resolve
from tests.helpers import REPO, cli_inproc, env


def write(path: Path, obj) -> Path:
    if isinstance(obj, bytes):
        path.write_bytes(obj)
    else:
        path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def records(name, dataset_dir: Path):
    spec = resolve([name], str(dataset_dir))[0]
    return read(spec)


def error_of(name, dataset_dir: Path) -> str:
    with pytest.raises(UserError) as e:
        records(name, dataset_dir)
    return str(e.value)


# ----------------------------------------------------------------------------- files: one line, exit status 2

ALPACA = [{"instruction": "Say hi.", "output": "Hi."}]


def _binary(d: Path) -> tuple[str, str]:
    write(d / "bin.jsonl", bytes(range(256)) * 4)
    write(d / "dataset_info.json", {"bin": {"file_name": "bin.jsonl"}})
    return "bin", f"data set 'bin': {d / 'bin.jsonl'}: not UTF-8 text (byte 0x80 at offset 128); save it as UTF-8"


def _latin1(d: Path) -> tuple[str, str]:
    write(d / "latin.json", json.dumps([{"instruction": "café", "output": "naïve"}]).replace("\\u00e9", "\u00e9")
          .replace("\\u00ef", "\u00ef").encode("latin-1"))
    write(d / "dataset_info.json", {"latin": {"file_name": "latin.json"}})
    return "latin", f"data set 'latin': {d / 'latin.json'}: not UTF-8 text (byte 0xe9 at offset 21)"


def _garbage_parquet(d: Path) -> tuple[str, str]:
    write(d / "g.parquet", b"PAR1 this is not a parquet file " * 20)
    write(d / "dataset_info.json", {"g": {"file_name": "g.parquet"}})
    return "g", f"data set 'g': {d / 'g.parquet'}: cannot read as a Parquet file (ArrowInvalid: "


def _info_not_utf8(d: Path) -> tuple[str, str]:
    write(d / "a.json", ALPACA)
    write(d / "dataset_info.json", '{"a": {"file_name": "a.json"}, "b": {"file_name": "caf\u00e9.json"}}'
          .encode("latin-1"))
    return "a", f"{d / 'dataset_info.json'}: not UTF-8 text (byte 0xe9 at offset 54); save it as UTF-8"


def _entry_is_a_string(d: Path) -> tuple[str, str]:
    write(d / "a.json", ALPACA)
    write(d / "dataset_info.json", {"a": "a.json"})
    return "a", (f"{d / 'dataset_info.json'}: entry 'a' is a JSON string (\"a.json\"), not a mapping; "
                 'write it as {"file_name": ..., "formatting": ...}')


def _empty_jsonl(d: Path) -> tuple[str, str]:
    write(d / "e.jsonl", "")
    write(d / "dataset_info.json", {"e": {"file_name": "e.jsonl"}})
    return "e", f"data set 'e': {d / 'e.jsonl'} has no records; add records or remove 'e' from data.datasets"


def _empty_json(d: Path) -> tuple[str, str]:
    write(d / "e.json", "")
    write(d / "dataset_info.json", {"e": {"file_name": "e.json"}})
    return "e", f"data set 'e': {d / 'e.json'} has no records; add records or remove 'e' from data.datasets"


def _blank_txt(d: Path) -> tuple[str, str]:
    write(d / "b.txt", "\n   \n\n")
    write(d / "dataset_info.json", {"b": {"file_name": "b.txt"}})
    return "b", f"data set 'b': {d / 'b.txt'} has no records; add records or remove 'b' from data.datasets"


@pytest.mark.parametrize("case", [_binary, _latin1, _garbage_parquet, _info_not_utf8, _entry_is_a_string,
                                  _empty_jsonl, _empty_json, _blank_txt], ids=lambda f: f.__name__.strip("_"))
def test_bad_data_file_is_one_line_naming_it_with_exit_2(tmp_path, case):
    d = tmp_path / "data"
    d.mkdir()
    name, expected = case(d)
    proc = cli_inproc(["train", f"output_dir={tmp_path / 'run'}", f"data.dataset_dir={d}", f"data.datasets=[{name}]",
                    f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=1", "parallel.device=cpu"])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""  # the start's lines (world size, data read so far) are not printed above the error
    errors = proc.stderr.splitlines()
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"fsdptrain: error: {expected}"), errors[0]


def test_other_unreadable_files_and_entries_are_one_line(tmp_path):
    write(tmp_path / "g.csv", b"\xff\xfe\x00garbage\x00\n\x01,\x02\n")
    write(tmp_path / "g.arrow", b"not an arrow stream")
    write(tmp_path / "n.json", "42")
    (tmp_path / "parts").mkdir()
    write(tmp_path / "parts" / "a.jsonl", "")
    write(tmp_path / "parts" / "b.jsonl", "\n\n")
    write(tmp_path / "z.csv", "")
    write(tmp_path / "dataset_info.json", {
        "csv": {"file_name": "g.csv"}, "arrow": {"file_name": "g.arrow"}, "num": {"file_name": "n.json"},
        "parts": {"file_name": "parts"}, "zero": {"file_name": "z.csv"},
        "cols": {"file_name": "n.json", "columns": ["instruction", "output"]},
        "tags": {"file_name": "n.json", "formatting": "sharegpt", "tags": {"role_tag": 1}}})
    assert error_of("csv", tmp_path).startswith(f"data set 'csv': {tmp_path / 'g.csv'}: cannot read as a CSV file (")
    assert error_of("arrow", tmp_path).startswith(
        f"data set 'arrow': {tmp_path / 'g.arrow'}: cannot read as an Arrow stream (")
    assert error_of("num", tmp_path) == (f"data set 'num': {tmp_path / 'n.json'}: holds a JSON number; expected an "
                                         "array of records (or one record per line)")
    assert error_of("parts", tmp_path) == (f"data set 'parts': {tmp_path / 'parts'} (2 files) has no records; add "
                                           "records or remove 'parts' from data.datasets")
    assert error_of("zero", tmp_path).startswith(f"data set 'zero': {tmp_path / 'z.csv'} has no records")
    info = tmp_path / "dataset_info.json"
    assert error_of("cols", tmp_path) == (f"{info}: entry 'cols': 'columns' must be a JSON object, not array "
                                          '(["instruction", "output"]); fix it in that entry')
    assert error_of("tags", tmp_path) == (f"{info}: entry 'tags': 'tags.role_tag' must be a string (a column or tag "
                                          "name), not number; fix it in that entry")
    with pytest.raises(UserError, match=r"data.datasets: entry .*: 'columns' must be a JSON object, not string"):
        resolve([{"path": str(tmp_path / "n.json"), "columns": "prompt"}], str(tmp_path))
    write(info, [{"file_name": "n.json"}])
    assert error_of("num", tmp_path) == (f"{info}: holds a JSON array, not a mapping of data set names to entries; "
                                         'write it as {"name": {"file_name": ...}, ...}')


# ----------------------------------------------------------------------------- records without text: skipped, counted


def test_records_without_text_are_skipped_counted_and_not_trained(tmp_path):
    from fsdptrain.config.schema import Config
    from fsdptrain.data import pipeline
    from fsdptrain.data.formats import convert
    from fsdptrain.data.tokenizer import build_char_tokenizer

    write(tmp_path / "a.json", [{"instruction": "Say hi.", "input": None, "output": "Hi."},
                                {"instruction": None, "input": None, "output": None},
                                {"instruction": "", "input": "  ", "output": "\n"},
                                {"instruction": "Say yo.", "input": None, "output": "Yo."}])
    write(tmp_path / "s.json", [{"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": None}]},
                                {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}])
    write(tmp_path / "t.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in ("A document.", None, "", "Another.")))
    write(tmp_path / "n.json", [{"instruction": None, "output": None}])
    write(tmp_path / "dataset_info.json", {"a": {"file_name": "a.json"}, "n": {"file_name": "n.json"},
                                           "s": {"file_name": "s.json", "formatting": "sharegpt"},
                                           "t": {"file_name": "t.jsonl", "columns": {"prompt": "text"}}})
    for name, kept, skipped in (("a", 2, 2), ("s", 1, 1), ("t", 2, 2)):
        spec = resolve([name], str(tmp_path))[0]
        conv = convert(spec, *read(spec))
        assert (conv.read, len(conv.records), conv.skipped) == (kept + skipped, kept, {"empty": skipped})
    assert error_of_convert("n", tmp_path) == ("data set 'n': all 1 records were skipped (1 empty); check its "
                                               "formatting (alpaca) and tags in dataset_info.json")
    cfg = Config()
    cfg.data.dataset_dir, cfg.data.datasets, cfg.data.cache_dir = str(tmp_path), ["a", "s", "t"], str(tmp_path / "c")
    lines: list[str] = []
    tok = build_char_tokenizer()
    examples = pipeline.load_examples(cfg, tok, log=lines.append)
    assert "data: 'a': read 4, skipped 2 (2 empty), kept 2, truncated 0, dropped (no target token left) 0" in lines
    assert "data: 's': read 2, skipped 1 (1 empty), kept 1, truncated 0, dropped (no target token left) 0" in lines
    assert "data: 't': read 4, skipped 2 (2 empty), kept 2, truncated 0, dropped (no target token left) 0" in lines
    assert any(x.startswith("data: total: read 10, skipped 5 (5 empty), kept 5 examples") for x in lines)
    chat = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n{}<|im_end|>\n".format
    assert sorted(tok.decode(examples[i].input_ids) for i in range(len(examples))) == sorted(
        [chat("Say hi.", "Hi."), chat("Say yo.", "Yo."), chat("hi", "yo"), "A document.<|im_end|>",
         "Another.<|im_end|>"])


def error_of_convert(name, dataset_dir: Path) -> str:
    from fsdptrain.data.formats import convert

    spec = resolve([name], str(dataset_dir))[0]
    with pytest.raises(UserError) as e:
        convert(spec, *read(spec))
    return str(e.value)


# ----------------------------------------------------------------------------- bounded work per record, same tokens

LF = REPO.parent / "shared" / "data" / "llamafactory"
TOKENIZERS = REPO.parent / "shared" / "tokenizers"
needs_fixtures = pytest.mark.skipif(not (LF / "c4_demo.jsonl").is_file(), reason=f"fixtures not found at {LF}")
TOKENIZER_KINDS = ["char", "bpe", "qwen3", "llama3.1"]


def c4_texts() -> list[str]:
    return [json.loads(line)["text"] for line in (LF / "c4_demo.jsonl").read_text().splitlines() if line.strip()]


def mixed_text(rng: random.Random, n: int) -> str:
    """Web text with CJK, digits, punctuation runs, tabs, blank lines and emoji mixed in: hard places to cut."""
    texts = c4_texts()
    odd = ["中文字符测试", "。", "，", "123456789", "3.14", "  ", "\n", "\n\n", "\t", "...", "!!", "😀", "é", "don't",
           "x_y", "--", "    code()", '{"a": 1}', "\r\n", "ÅÄÖ"]
    out: list[str] = []
    while sum(map(len, out)) < n:
        out.append(rng.choice(texts)[: rng.randint(50, 800)] if rng.random() < 0.5
                   else "".join(rng.choice(odd) for _ in range(rng.randint(1, 30))))
    return "".join(out)


@pytest.fixture(scope="module", params=TOKENIZER_KINDS)
def any_tok(request):
    from fsdptrain.data.tokenizer import apply_template, build_char_tokenizer

    kind = request.param
    if kind == "char":
        return build_char_tokenizer()
    if kind == "bpe":  # byte-level BPE trained here, as in test_data.py, with the built-in ChatML template
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        core.train_from_iterator(c4_texts()[:100], trainers.BpeTrainer(
            vocab_size=800, special_tokens=["<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>")
        apply_template(tok, "chatml")
        return tok
    if not (TOKENIZERS / kind / "tokenizer.json").is_file():
        pytest.skip(f"real tokenizer not found at {TOKENIZERS / kind}")
    from fsdptrain.data.tokenizer import load_tokenizer

    return load_tokenizer(str(TOKENIZERS / kind), None)


@needs_fixtures
def test_long_documents_tokenise_in_slices_to_the_tokens_of_the_whole(any_tok, monkeypatch):
    from fsdptrain.data import encode

    monkeypatch.setattr(encode, "SLICE_CHARS", 2000)  # dozens of slice boundaries in each document
    rng = random.Random(0)
    eos = [any_tok.eos_token_id] if any_tok.eos_token_id is not None else []
    for text in ["\n\n".join(c4_texts()[:40]), mixed_text(rng, 40_000), mixed_text(rng, 40_000)]:
        assert encode.tokenize_document(any_tok, text).tolist() == any_tok(text)["input_ids"] + eos


@needs_fixtures
def test_over_long_turns_are_elided_and_the_surviving_tokens_are_unchanged(any_tok, monkeypatch):
    from fsdptrain.data import encode
    from fsdptrain.data.encode import TemplateError, build_example, segments, tokenize_conversation

    elided = []
    elide = encode.elide
    monkeypatch.setattr(encode, "elide", lambda *a, **k: elided.append(elide(*a, **k)) or elided[-1])
    rng = random.Random(1)
    compared = 0
    for _ in range(6):
        a, b = mixed_text(rng, rng.randint(3000, 8000)), mixed_text(rng, rng.randint(3000, 8000))
        shapes = [
            [{"role": "user", "content": "Summarise."}, {"role": "assistant", "content": a}],  # response cut
            [{"role": "user", "content": a}, {"role": "assistant", "content": "Short."}],  # prompt cut
            [{"role": "user", "content": a}, {"role": "assistant", "content": b}],  # both long: proportional
            [{"role": "system", "content": b}, {"role": "user", "content": "q"}, {"role": "assistant", "content": a}],
            [{"role": "user", "content": "q1"}, {"role": "assistant", "content": a}, {"role": "user", "content": b},
             {"role": "assistant", "content": "ok"}],
        ]
        for messages in shapes:
            for max_length in (32, 200):
                for train_on_prompt, mask_history in ((False, False), (True, False), (False, True)):
                    try:  # what tokenising everything gives
                        want = build_example(segments(any_tok, messages), max_length, train_on_prompt, mask_history)
                    except TemplateError:  # Qwen3's template rewrites earlier turns: refused either way
                        continue
                    elided.clear()
                    got = tokenize_conversation(any_tok, messages, max_length, None, train_on_prompt, mask_history)
                    assert any(e is not None for e in elided)
                    assert (got[0].input_ids, got[0].labels, got[1]) == (want[0].input_ids, want[0].labels, want[1])
                    compared += 1
    assert compared >= 100


@needs_fixtures
def test_cached_rows_equal_in_process_tokenisation(tmp_path, monkeypatch):
    """The Arrow rows of the cache (documents, conversations, a mixed batch, a dropped 1-token tail)."""
    from fsdptrain.data import cache, encode
    from fsdptrain.data.encode import tokenize_record
    from fsdptrain.data.formats import convert
    from fsdptrain.data.tokenizer import build_char_tokenizer

    monkeypatch.setattr(encode, "SLICE_CHARS", 1000)
    tok = build_char_tokenizer()
    long = " ".join(c4_texts()[:5])
    write(tmp_path / "docs.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in [long, "x" * 127, "y" * 128]))
    write(tmp_path / "dataset_info.json", {"docs": {"file_name": "docs.jsonl", "columns": {"prompt": "text"}},
                                           "identity": {"file_name": str(LF / "identity.json")}})
    specs = resolve(["identity", "docs"], str(tmp_path))
    s = cache.Settings(max_length=64, train_on_prompt=False, mask_history=False, max_samples=None, seed=1)
    got, total, per_set, _ = cache.prepare(specs, tok, s, tmp_path / "c", 0, 0, False, lambda m: None)
    want = []
    for spec in specs:
        for record in convert(spec, *read(spec)).records:
            want += tokenize_record(tok, record, 64)[0]
    assert [(e.input_ids, e.labels) for e in want] == [(got[i].input_ids, got[i].labels) for i in range(len(got))]
    # "x" * 127 + end of sequence: two full chunks; "y" * 128: two chunks and a 1-token tail, dropped
    assert per_set[1]["dropped_no_target"] == 1 and per_set[1]["kept"] == len(want) - 91
    assert total.target_tokens == sum(e.n_targets for e in want)


PEAK_RSS = """
import json, sys
from fsdptrain.config.schema import Config
from fsdptrain.data import pipeline
from fsdptrain.data.tokenizer import build_char_tokenizer
cfg = Config()
cfg.data.dataset_dir, cfg.data.datasets, cfg.data.cache_dir = sys.argv[1], [sys.argv[2]], sys.argv[3]
cfg.data.max_length = 2048
examples = pipeline.load_examples(cfg, build_char_tokenizer(), log=lambda m: None)
peak = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:"))
print(json.dumps({"peak_kib": peak, "examples": len(examples), "first": len(examples[0].input_ids)}))
"""


PROSE = "lorem ipsum dolor sit amet, consectetur adipiscing elit; sed do eiusmod tempor.\\n"  # JSON-escaped


def _giant(path: Path, head: str, size: int, tail: str) -> int:
    """A one-record .jsonl whose one string is about `size` characters of prose, written without building it in
    memory; the string's length."""
    with path.open("w") as fh:
        fh.write(head)
        for _ in range(size // len(PROSE)):
            fh.write(PROSE)
        fh.write(tail)
    return size // len(PROSE) * (len(PROSE) - 1)  # the escaped newline is one character


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak RSS from /proc")
@pytest.mark.parametrize("kind", ["alpaca", "text"])
def test_one_giant_record_keeps_the_tokenising_process_under_1_5_gib(tmp_path, kind):
    # 50 MB record: before the bound, tokenising took about 420 MiB per MB (a 10 MiB text took 4.1 GiB)
    size = 50_000_000 if kind == "alpaca" else 20_000_000  # a document trains whole: 20 MB keeps the test short
    if kind == "alpaca":
        chars = _giant(tmp_path / "big.jsonl", '{"instruction": "Write a lot.", "output": "', size, '"}\n')
        write(tmp_path / "dataset_info.json", {"big": {"file_name": "big.jsonl"}})
    else:
        chars = _giant(tmp_path / "big.jsonl", '{"text": "', size, '"}\n')
        write(tmp_path / "dataset_info.json", {"big": {"file_name": "big.jsonl", "columns": {"prompt": "text"}}})
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(tmp_path), "big", str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=600, env=env())
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{kind}: {size / 1e6:.0f} MB record, peak RSS {out['peak_kib'] / 1024:.0f} MiB")
    assert out["peak_kib"] < 1.5 * 1024 * 1024
    if kind == "alpaca":
        assert out["examples"] == 1 and out["first"] == 2048  # truncated to max_length, as before
    else:
        assert out["examples"] == -(-(chars + 1) // 2048) and out["first"] == 2048  # every chunk kept


def test_a_data_file_gone_before_hashing_is_one_line(tmp_path):
    """The cache key reads every data file too (its content hash): through files.py like every other read."""
    from fsdptrain.data import cache
    from fsdptrain.data.tokenizer import build_char_tokenizer

    write(tmp_path / "a.json", ALPACA)
    write(tmp_path / "dataset_info.json", {"a": {"file_name": "a.json"}})
    specs = resolve(["a"], str(tmp_path))
    (tmp_path / "a.json").unlink()
    s = cache.Settings(max_length=64, train_on_prompt=False, mask_history=False, max_samples=None, seed=1)
    with pytest.raises(UserError) as e:
        cache.prepare(specs, build_char_tokenizer(), s, tmp_path / "c", 0, 0, False, lambda m: None)
    assert str(e.value) == f"{tmp_path / 'a.json'}: no such file; check the path"
