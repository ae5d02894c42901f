"""Find and read data sets: dataset_info.json entries, local files and folders, saved and hub data sets.

`data.datasets` lists names or paths. A name is looked up in
`<dataset_dir>/dataset_info.json` (LLaMA-Factory's registry: file_name,
formatting, columns, tags, num_samples, ranking, hf_hub_url, subset, split); a path is a
file (json array, jsonl, parquet, csv, arrow, txt), a folder of files of one
type, or a folder written by `datasets.save_to_disk`. An entry may also be a
mapping {name or path, formatting, columns, tags, num_samples, ranking} for data
that is not in a registry. `ranking: true` marks preference pairs (formats.py).

Reading gives plain Python records plus, per record, where it came from
("file line N" / "record N") so that format errors can point at it. Every
file (dataset_info.json and data files alike) is read through files.py, so a
file that is not UTF-8, not valid JSON or not a readable Parquet/CSV/Arrow file
ends the run with one line naming the data set and the file; a data set
without any record is an error too.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from ..core.errors import UserError
from ..core.files import FileError, read_json, read_text, reading
from .formats import FORMATS, Spec

EXTENSIONS = {".json": "json", ".jsonl": "jsonl", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow",
              ".txt": "txt"}
UNSUPPORTED = ("images", "videos", "audios")
PAIR_COLUMNS = ("chosen", "rejected")


def registry(dataset_dir: Path) -> dict[str, tuple[Any, Path]]:
    """dataset_info.json (plus dataset_info.*.json beside it) as {name: (entry, file it is in)}; empty if none."""
    entries: dict = {}
    for path in [dataset_dir / "dataset_info.json", *sorted(dataset_dir.glob("dataset_info.*.json"))]:
        if not path.is_file():
            continue
        data = read_json(path, "dataset_info.json")
        if not isinstance(data, dict):
            raise UserError(f"{path}: holds a JSON {_json_type(data)}, not a mapping of data set names to "
                            'entries; write it as {"name": {"file_name": ...}, ...}')
        entries.update({name: (entry, path) for name, entry in data.items()})
    return entries


# the type each dataset_info.json field must have where fsdptrain reads it (num_samples is checked in _spec)
ENTRY_FIELDS = {"file_name": str, "formatting": str, "columns": dict, "tags": dict, "hf_hub_url": str,
                "subset": str, "split": str, "ranking": bool}


def _check_entry(entry: Any, where: str) -> dict:
    """A registry entry (or a data.datasets mapping) with the fields fsdptrain reads of the right type."""
    if not isinstance(entry, dict):
        raise UserError(f"{where} is a JSON {_json_type(entry)} ({json.dumps(entry)[:60]}), not a mapping; "
                        'write it as {"file_name": ..., "formatting": ...}')
    for key, kind in ENTRY_FIELDS.items():
        value = entry.get(key)
        if value is not None and not isinstance(value, kind):
            raise UserError(f"{where}: '{key}' must be a JSON {_json_type(kind())}, not {_json_type(value)} "
                            f"({json.dumps(value)[:60]}); fix it in that entry")
        if kind is dict and value:
            bad = [k for k, v in value.items() if v is not None and not isinstance(v, str)]
            if bad:
                raise UserError(f"{where}: '{key}.{bad[0]}' must be a string (a column or tag name), not "
                                f"{_json_type(value[bad[0]])}; fix it in that entry")
    return entry


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def resolve(datasets: list, dataset_dir: str) -> list[Spec]:
    """data.datasets entries -> Specs, each with its files checked to exist."""
    root = Path(dataset_dir).expanduser()
    known = registry(root)
    specs = []
    for item in datasets:
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or not ({"name", "path"} & set(item)):
            raise UserError(f"data.datasets: entry {item!r} needs a name (in dataset_info.json) or a path")
        extra = set(item) - {"name", "path", "formatting", "columns", "tags", "num_samples", "ranking"}
        if extra:
            raise UserError(f"data.datasets: entry {item!r}: unknown field(s) {', '.join(sorted(extra))} "
                            "(allowed: name, path, formatting, columns, tags, num_samples, ranking)")
        _check_entry({k: v for k, v in item.items() if k in ("columns", "tags", "formatting", "ranking")},
                     f"data.datasets: entry {item!r}")
        name = item.get("name") or item["path"]
        entry = {}
        if "path" not in item and name in known:
            found, info = known[name]
            entry = dict(_check_entry(found, f"{info}: entry '{name}'"))
        if "path" not in item and name not in known:
            candidate = Path(name).expanduser() if Path(name).expanduser().exists() else root / name
            if not candidate.exists():
                names = ", ".join(sorted(known)) or f"none: no dataset_info.json in {root}"
                raise UserError(f"data.datasets: unknown data set '{name}' (not in {root / 'dataset_info.json'} "
                                f"and no such file or folder); known: {names}")
            item = {**item, "path": str(candidate)}
        for key in ("formatting", "columns", "tags", "num_samples", "ranking"):
            if key in item:
                entry[key] = item[key]
        info = known[name][1] if name in known else root / "dataset_info.json"
        specs.append(_spec(name, entry, item.get("path"), root, info))
    return specs


def _spec(name: str, entry: dict, path: Optional[str], root: Path, info: Path) -> Spec:
    where = f"data set '{name}'"
    bad = [k for k in UNSUPPORTED if entry.get(k) or k in entry.get("columns", {})]
    if bad:
        raise UserError(f"{where}: uses {', '.join(bad)} (multimodal data), which fsdptrain does "
                        "not train; pick a supervised, pretraining, preference (ranking) or KTO data set")
    ranking = bool(entry.get("ranking"))
    if ranking and (entry.get("columns") or {}).get("kto_tag"):
        raise UserError(f"{where}: maps a kto_tag column and is marked `ranking: true`; KTO data is single "
                        "responses tagged desirable or not: remove one of them")
    pair_columns = [k for k in PAIR_COLUMNS if k in (entry.get("columns") or {})]
    if pair_columns and not ranking:
        raise UserError(f"{where}: maps columns {', '.join(pair_columns)} (preference pairs) but is not marked "
                        "`ranking: true`; add `\"ranking\": true` to its entry (and train it with "
                        "train.objective=dpo)")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATS:
        raise UserError(f"{where}: formatting '{formatting}' is not one of {', '.join(FORMATS)}")
    if ranking and formatting == "text":
        raise UserError(f"{where}: `ranking: true` with formatting text; preference pairs are alpaca, sharegpt "
                        "or openai records")
    num = entry.get("num_samples")
    if num is not None and (not isinstance(num, int) or num < 1):
        raise UserError(f"{where}: num_samples must be a positive integer, got {num!r}")
    spec = Spec(name=name, files=[], formatting=formatting, columns=dict(entry.get("columns") or {}),
                tags=dict(entry.get("tags") or {}), num_samples=num, ranking=ranking)
    if path is None and "file_name" not in entry:
        hub = entry.get("hf_hub_url")
        if not hub:
            raise UserError(f"{where}: its dataset_info.json entry has neither file_name nor hf_hub_url")
        spec.hub = {"path": hub, "subset": entry.get("subset"), "split": entry.get("split", "train")}
        return spec
    target = Path(path) if path is not None else root / entry["file_name"]
    if not target.exists():
        origin = f"file_name in {info}" if path is None else "path in data.datasets"
        raise UserError(f"{where}: file {target} not found ({origin}); check the path or data.dataset_dir")
    if target.is_dir():
        if (target / "dataset_info.json").is_file() and (target / "state.json").is_file():
            spec.files, spec.saved = [str(target)], True
            return spec
        files = sorted(p for p in target.iterdir() if p.is_file() and not p.name.startswith("."))
        kinds = {EXTENSIONS.get(p.suffix) for p in files}
        if not files or None in kinds or len(kinds) != 1:
            raise UserError(f"{where}: folder {target} must hold files of one supported type "
                            f"({', '.join(EXTENSIONS)}); "
                            f"found {', '.join(sorted(p.name for p in files)[:5]) or 'nothing'}")
        spec.files = [str(p) for p in files]
    else:
        if target.suffix not in EXTENSIONS:
            raise UserError(f"{where}: {target}: unsupported file type '{target.suffix}' "
                            f"(use {', '.join(EXTENSIONS)})")
        spec.files = [str(target)]
    return spec


# ----------------------------------------------------------------------------- reading


def read(spec: Spec) -> tuple[list[dict], list[str]]:
    """All records of a data set and, per record, where it is (for error messages); an error if there is none."""
    if spec.hub is not None:
        return _read_hub(spec)
    if spec.saved:
        records, where = _read_saved(spec)
    else:
        records, where = [], []
        for f in spec.files:
            rows, locs = _read_file(spec, Path(f))
            records += rows
            where += locs
    if not records:  # spec.files of a saved data set is its one folder
        what = spec.files[0] if len(spec.files) == 1 else f"{Path(spec.files[0]).parent} ({len(spec.files)} files)"
        raise UserError(f"data set '{spec.name}': {what} has no records; add records or remove '{spec.name}' from "
                        "data.datasets")
    return records, where


def _read_saved(spec: Spec) -> tuple[list[dict], list[str]]:
    """A folder written by datasets.save_to_disk (its train split, else its first)."""
    import datasets

    with _reading(spec, spec.files[0], "a folder saved by datasets.save_to_disk"):
        ds = datasets.load_from_disk(spec.files[0])
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        rows = ds.to_list()
    return rows, [f"{spec.files[0]} record {i}" for i in range(len(rows))]


@contextmanager
def _reading(spec: Spec, path: str | Path, what: str) -> Iterator[None]:
    """files.reading, with the data set named in front of the file."""
    try:
        with reading(path, what):
            yield
    except FileError as e:
        raise FileError(f"data set '{spec.name}': {e}") from None


def _read_file(spec: Spec, path: Path) -> tuple[list[dict], list[str]]:
    kind = EXTENSIONS[path.suffix]
    if kind in ("jsonl", "json", "txt"):
        with _reading(spec, path, f"a .{kind} data file"):
            text = read_text(path)
        if kind == "jsonl":
            return _jsonl_text(spec, path, text)
        if kind == "txt":
            lines = [ln.rstrip("\n") for ln in text.splitlines()]
            rows = [{"text": ln} for ln in lines if ln.strip()]  # blank lines separate documents: not records
            return rows, [f"{path} line {i + 1}" for i, ln in enumerate(lines) if ln.strip()]
        if not text.strip():
            return [], []
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":  # several objects, one per line: really jsonl
                return _jsonl_text(spec, path, text)
            raise UserError(f"data set '{spec.name}': {path} line {e.lineno}: malformed JSON ({e.msg} at column "
                            f"{e.colno}); fix the file") from None
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise UserError(f"data set '{spec.name}': {path}: holds a JSON {_json_type(data)}; expected an array "
                            "of records (or one record per line)")
        return data, [f"{path} record {i}" for i in range(len(data))]
    if path.stat().st_size == 0:  # pyarrow refuses an empty CSV; an empty file simply has no records
        return [], []
    import pyarrow as pa

    with _reading(spec, path, {"parquet": "a Parquet file", "csv": "a CSV file", "arrow": "an Arrow stream"}[kind]):
        if kind == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        elif kind == "csv":
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(path)
        else:  # arrow stream, as written by `datasets`
            with pa.memory_map(str(path)) as src:
                table = pa.ipc.open_stream(src).read_all()
        rows = table.to_pylist()
    return rows, [f"{path} record {i}" for i in range(len(rows))]


def _jsonl_text(spec: Spec, path: Path, text: str) -> tuple[list[dict], list[str]]:
    rows, locs = [], []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(f"data set '{spec.name}': {path} line {n}: malformed JSON ({e.msg} at column "
                            f"{e.colno}); fix or remove that line") from None
        locs.append(f"{path} line {n}")
    return rows, locs


def _read_hub(spec: Spec) -> tuple[list[dict], list[str]]:
    import datasets

    h = spec.hub
    try:
        ds = datasets.load_dataset(h["path"], h["subset"], split=h["split"])
    except Exception as e:  # offline, unknown name, gated: one line, the user's to fix
        raise UserError(f"data set '{spec.name}': cannot load hub data set {h['path']} "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        "check the name and network, or download it and point file_name at it") from None
    rows = ds.to_list()
    return rows, [f"{h['path']} record {i}" for i in range(len(rows))]


def sample(records: list[Any], where: list[str], n: Optional[int], seed: int) -> tuple[list[Any], list[str]]:
    """Take n records: a seeded subset when n is smaller, whole copies plus a seeded remainder when larger."""
    if n is None or n == len(records) or not records:
        return records, where
    rng = random.Random(seed)
    idx = list(range(len(records))) * (n // len(records))
    idx += rng.sample(range(len(records)), n % len(records))
    return [records[i] for i in idx], [where[i] for i in idx]


def fingerprint_files(spec: Spec) -> list[str]:
    """The files whose content identifies this data set (for the cache key)."""
    if spec.saved:
        return sorted(str(p) for p in Path(spec.files[0]).rglob("*") if p.is_file())
    return list(spec.files)
