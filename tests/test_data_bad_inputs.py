"""Bad data inputs end in one line naming the file; unusable records are counted, not trained; the work per
record is bounded by max_length (memory measured in a subprocess), with the same tokens as tokenising everything.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fsdptrain.data.sources import read, resolve
from fsdptrain.errors import UserError
from tests.helpers import run_cli


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


def _blank_txt(d: Path) -> tuple[str, str]:
    write(d / "b.txt", "\n   \n\n")
    write(d / "dataset_info.json", {"b": {"file_name": "b.txt"}})
    return "b", f"data set 'b': {d / 'b.txt'} has no records; add records or remove 'b' from data.datasets"


@pytest.mark.parametrize("case", [_binary, _latin1, _garbage_parquet, _info_not_utf8, _entry_is_a_string,
                                  _empty_jsonl, _blank_txt], ids=lambda f: f.__name__.strip("_"))
def test_bad_data_file_is_one_line_naming_it_with_exit_2(tmp_path, case):
    d = tmp_path / "data"
    d.mkdir()
    name, expected = case(d)
    proc = run_cli(["train", f"output_dir={tmp_path / 'run'}", f"data.dataset_dir={d}", f"data.datasets=[{name}]",
                    f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=1", "parallel.device=cpu"], timeout=180)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fsdptrain: error:")]
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
    from fsdptrain.config import Config
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
