"""Tokenise once per node into an on-disk cache; every rank then reads it memory-mapped.

Local rank 0 of each node computes the cache key (data files' content,
data-set settings, tokenizer, chat template, cutoff and masking options), and
if that key is not cached yet: reads and converts the records, tokenises them
with `datasets.map(num_proc=...)`, and saves the result under
`<cache_dir>/<key>` (written to a temporary folder and renamed, so two nodes
sharing a file system cannot leave a half-written cache). The other ranks wait
in one all_gather, which also carries any error from local rank 0 to every
rank, so a bad data file stops the whole job with its message instead of a hang.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch.distributed as dist

from ..core.errors import UserError
from ..core.files import reading
from ..dist.distributed import exchange_by_store
from . import formats, sources
from .encode import (
    IGNORE,
    Example,
    Feedback,
    Pair,
    PairError,
    TemplateError,
    TokenizeStats,
    chunk_lengths,
    conversation_examples,
    tokenize_document,
    tokenize_feedback,
    tokenize_pair,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CACHE_VERSION = 3  # bump when the tokenised layout or the rules change


@dataclass
class Settings:
    """Everything besides the files and the tokenizer that changes the tokenised result."""

    max_length: int
    train_on_prompt: bool
    mask_history: bool
    max_samples: Optional[int]
    seed: int
    num_proc: int = 1
    template: str = "auto"  # data.template, named in errors (the template's text is in the tokenizer digest)


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with reading(path, "a data file"), open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_digest(tok: PreTrainedTokenizerBase) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    extra = json.dumps([type(tok).__name__, tok.chat_template, tok.bos_token_id, tok.eos_token_id,
                        str(getattr(tok, "add_bos_token", None))], default=str)
    return hashlib.sha256((body + extra).encode()).hexdigest()


def cache_key(specs: list[formats.Spec], tok: PreTrainedTokenizerBase, s: Settings) -> str:
    sets = []
    for spec in specs:
        files = {} if spec.hub else {f: file_digest(f) for f in sources.fingerprint_files(spec)}
        entry = {"name": spec.name, "formatting": spec.formatting, "columns": spec.columns, "tags": spec.tags,
                 "num_samples": spec.num_samples, "hub": spec.hub, "files": sorted(files.values())}
        if spec.ranking:  # only then: the keys of supervised data sets stay what they were
            entry["ranking"] = True
        if spec.feedback:  # the KL responses' rule (formats.assign_kl_responses)
            entry["kl_chunk"] = formats.KL_CHUNK
        sets.append(entry)
    settings = {k: v for k, v in asdict(s).items() if k not in ("num_proc", "template")}
    blob = json.dumps({"v": CACHE_VERSION, "sets": sets, "tok": tokenizer_digest(tok), "s": settings},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


# ----------------------------------------------------------------------------- building


def template_fix(tok: PreTrainedTokenizerBase) -> str:
    """The fix a template refusal suggests: fsdptrain's own template that suits the tokenizer's special tokens."""
    name = "llama3" if "<|start_header_id|>" in tok.get_vocab() else "chatml"
    return (f"set data.template={name} (fsdptrain's own, which renders tools, tool calls and reasoning) or use a "
            "tokenizer whose template does; see docs/templates.md")


def _tokenize_batch(batch: dict, tok: PreTrainedTokenizerBase, max_length: int, train_on_prompt: bool,
                    mask_history: bool, template_label: str = "the chat template"):
    """datasets.map function: records (JSON) -> rows; a record with no example left gives one empty row.

    The rows come back as one Arrow table of int32 arrays: a long document's tokens stay one array (4 bytes a
    token) instead of Python lists, and when every row trains all its tokens (documents) the labels column
    shares the input_ids array.
    """
    import numpy as np
    import pyarrow as pa

    ids: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    cols: dict[str, list[int]] = {k: [] for k in ("length", "source", "truncated", "split", "dropped")}

    def row(length: int, source: int, truncated: int = 0, split: int = 0, dropped: int = 0) -> None:
        for k, v in zip(cols, (length, source, truncated, split, dropped)):
            cols[k].append(v)

    for text, source, where in zip(batch["record"], batch["source"], batch["where"]):
        record = json.loads(text)
        if "text" in record:
            doc = tokenize_document(tok, record.pop("text"))
            kept, n_chunks = chunk_lengths(len(doc), max_length)
            ids.append(doc[:sum(kept)])
            labels.append(ids[-1])
            for j, n in enumerate(kept or [0]):
                row(n, source, split=n_chunks - 1 if j == 0 else 0, dropped=n_chunks - len(kept) if j == 0 else 0)
            continue
        try:
            made = conversation_examples(tok, record["messages"], max_length, record.get("tools"),
                                         train_on_prompt, mask_history)
        except TemplateError as e:
            raise UserError(f"{where}: {template_label}: {e}; {template_fix(tok)}") from None
        kept = [(ex, t) for ex, t in made if ex.n_targets > 0]
        dropped = max(len(made), 1) - len(kept)
        extra = max(len(made) - 1, 0)  # the template renders the conversation as several examples
        truncated = sum(int(t) for _, t in made)
        for j, (ex, _) in enumerate(kept):
            ids.append(np.asarray(ex.input_ids, dtype=np.int32))
            labels.append(np.asarray(ex.labels, dtype=np.int32))
            row(len(ex.input_ids), source, *((truncated, extra, dropped) if j == 0 else (0, 0, 0)))
        if not kept:
            row(0, source, truncated=truncated, split=extra, dropped=dropped)

    def lists(parts: list[np.ndarray]) -> pa.Array:
        values = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0, np.int32)
        offsets = np.zeros(len(cols["length"]) + 1, dtype=np.int32)
        np.cumsum(cols["length"], out=offsets[1:])
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))

    shared = all(a is b for a, b in zip(ids, labels))
    input_ids = lists(ids)
    ids.clear()
    target = input_ids if shared else lists(labels)
    labels.clear()
    types = {"length": pa.int32(), "source": pa.int16(), "truncated": pa.int8(), "split": pa.int32(),
             "dropped": pa.int32()}
    return pa.table({"input_ids": input_ids, "labels": target,
                     **{k: pa.array(v, type=types[k]) for k, v in cols.items()}})


def _tokenize_pairs(batch: dict, tok: PreTrainedTokenizerBase, max_length: int, train_on_prompt: bool,
                    mask_history: bool, template_label: str = "the chat template") -> dict:
    """datasets.map function for preference pairs: records (JSON) -> one row per pair, the chosen row's tokens
    in input_ids/labels and the rejected row's in rejected_ids/rejected_labels; length is the longer row's."""
    out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "rejected_ids", "rejected_labels", "length",
                                            "source", "truncated", "split", "dropped")}
    for text, source, where in zip(batch["record"], batch["source"], batch["where"]):
        record = json.loads(text)
        try:
            pair, truncated = tokenize_pair(tok, record["messages"], record["chosen"], record["rejected"],
                                            max_length, record.get("tools"))
        except TemplateError as e:
            raise UserError(f"{where}: {template_label}: {e}; {template_fix(tok)}") from None
        except PairError as e:
            raise UserError(f"{where}: {e}; raise data.max_length or shorten the record") from None
        c, r = pair.chosen, pair.rejected
        for k, v in (("input_ids", c.input_ids), ("labels", c.labels), ("rejected_ids", r.input_ids),
                     ("rejected_labels", r.labels), ("length", max(len(c.input_ids), len(r.input_ids))),
                     ("source", source), ("truncated", int(truncated)), ("split", 0), ("dropped", 0)):
            out[k].append(v)
    return out


def _tokenize_feedback(batch: dict, tok: PreTrainedTokenizerBase, max_length: int, train_on_prompt: bool,
                       mask_history: bool, template_label: str = "the chat template") -> dict:
    """datasets.map function for KTO examples: records (JSON, with their kl_response) -> one row each, the
    example's tokens in input_ids/labels, its KL row's in kl_ids/kl_labels, its tag in desirable; length is the
    longer row's."""
    out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "kl_ids", "kl_labels", "desirable", "length",
                                            "source", "truncated", "split", "dropped")}
    for text, source, where in zip(batch["record"], batch["source"], batch["where"]):
        try:
            fb, truncated = tokenize_feedback(tok, json.loads(text), max_length)
        except TemplateError as e:
            raise UserError(f"{where}: {template_label}: {e}; {template_fix(tok)}") from None
        except PairError as e:
            raise UserError(f"{where}: {e}; raise data.max_length or shorten the record") from None
        e, kl = fb.example, fb.kl
        for k, v in (("input_ids", e.input_ids), ("labels", e.labels), ("kl_ids", kl.input_ids),
                     ("kl_labels", kl.labels), ("desirable", int(fb.desirable)),
                     ("length", max(len(e.input_ids), len(kl.input_ids))), ("source", source),
                     ("truncated", int(truncated)), ("split", 0), ("dropped", 0)):
            out[k].append(v)
    return out


def build(specs: list[formats.Spec], tok: PreTrainedTokenizerBase, s: Settings, target: Path,
          log: Callable[[str], None]) -> None:
    """Read, convert, tokenise and save one cache entry at `target`."""
    import datasets

    records: list[str] = []
    source: list[int] = []
    where: list[str] = []
    per_set: list[dict] = []
    feedback: list[dict] = []  # KTO records, kept as dicts until every data set is read (their KL responses)
    for d, spec in enumerate(specs):
        rows, locs = sources.read(spec)
        rows, locs = sources.sample(rows, locs, spec.num_samples, s.seed + d)
        if s.max_samples is not None:
            rows, locs = rows[: s.max_samples], locs[: s.max_samples]
        conv = formats.convert(spec, rows, locs)
        if spec.feedback:
            feedback += conv.records
        else:
            records += [json.dumps(r, ensure_ascii=False) for r in conv.records]
        source += [d] * len(conv.records)
        where += conv.where
        per_set.append({"name": spec.name, "read": conv.read, "skipped": conv.skipped})
        del rows, locs, conv  # a data set's records live on only as the JSON text above
    if feedback:  # pipeline.check_objective: then every data set is KTO data
        formats.assign_kl_responses(feedback)
        records = [json.dumps(r, ensure_ascii=False) for r in feedback]
        del feedback
    tmp = target.parent / f".{target.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "map").mkdir(parents=True)  # datasets.map's own files stay inside our temporary folder
    try:
        raw = datasets.Dataset.from_dict({"record": records, "source": source, "where": where})
        n_records = len(records)
        del records, source, where  # the Arrow copy is what map reads
        log(f"data: tokenising {n_records} records with {s.num_proc} process(es) into {target}")
        pairs = any(spec.ranking for spec in specs)  # pipeline.check_objective: then all of them are
        kto = any(spec.feedback for spec in specs)  # likewise
        fn = _tokenize_pairs if pairs else _tokenize_feedback if kto else _tokenize_batch
        tokenized = raw.map(fn, batched=True, batch_size=256,
                            num_proc=s.num_proc if s.num_proc > 1 else None, remove_columns=raw.column_names,
                            new_fingerprint=target.name,
                            fn_kwargs={"tok": tok, "max_length": s.max_length, "train_on_prompt": s.train_on_prompt,
                                       "mask_history": s.mask_history, "template_label": template_label(s.template)},
                            features=_features(pairs, kto), cache_file_name=str(tmp / "map" / "tokenized.arrow"),
                            desc="tokenising")
        lengths = tokenized.data.column("length").to_numpy()
        counts = {c: tokenized.data.column(c).to_numpy() for c in ("source", "truncated", "split", "dropped")}
        keep = (lengths > 0).nonzero()[0]
        kept = tokenized.select(keep).remove_columns(["truncated", "split", "dropped"])
        kept.save_to_disk(str(tmp / "examples"))
        del tokenized, kept
        shutil.rmtree(tmp / "map", ignore_errors=True)
        for d, entry in enumerate(per_set):
            mine = counts["source"] == d
            kept_mine = mine & (lengths > 0)
            entry.update(truncated=int(counts["truncated"][mine].sum()), split=int(counts["split"][mine].sum()),
                         dropped_no_target=int(counts["dropped"][mine].sum()), kept=int(kept_mine.sum()))
        meta = {"version": CACHE_VERSION, "sets": per_set}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    except BaseException:  # leave no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, target)
    except OSError:  # another node finished the same key first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)


def template_label(name: str) -> str:
    return "the tokenizer's chat template (data.template=auto)" if name == "auto" else f"data.template={name}"


def _features(pairs: bool = False, kto: bool = False):
    import datasets

    rows = ("input_ids", "labels", "rejected_ids", "rejected_labels") if pairs else \
        ("input_ids", "labels", "kl_ids", "kl_labels") if kto else ("input_ids", "labels")
    return datasets.Features({
        **{k: datasets.List(datasets.Value("int32")) for k in rows},
        **({"desirable": datasets.Value("int8")} if kto else {}),
        "length": datasets.Value("int32"), "source": datasets.Value("int16"), "truncated": datasets.Value("int8"),
        "split": datasets.Value("int32"), "dropped": datasets.Value("int32")})


# ----------------------------------------------------------------------------- reading


class TokenizedExamples:
    """The cached examples, memory-mapped: a sequence of Example (of Pair for preference data) with their lengths
    at hand."""

    def __init__(self, path: Path):
        import datasets

        self.path = path
        self.ds = datasets.load_from_disk(str(path / "examples"))
        self.lengths = self.ds.data.column("length").to_numpy()
        self.pairs = "rejected_ids" in self.ds.column_names
        self.feedback = "kl_ids" in self.ds.column_names

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Example | Pair | Feedback:
        row = self.ds[int(i)]
        if self.feedback:
            return Feedback(Example(row["input_ids"], row["labels"]), Example(row["kl_ids"], row["kl_labels"]),
                            bool(row["desirable"]))
        if self.pairs:
            return Pair(Example(row["input_ids"], row["labels"]), Example(row["rejected_ids"], row["rejected_labels"]))
        return Example(row["input_ids"], row["labels"])


def stats_from_meta(meta: dict, examples: TokenizedExamples) -> tuple[TokenizeStats, list[dict]]:
    total = TokenizeStats()
    for entry in meta["sets"]:
        total.add(TokenizeStats(read=entry["read"], kept=entry["kept"], truncated=entry["truncated"],
                                split=entry["split"], dropped_no_target=entry["dropped_no_target"],
                                reasons=dict(entry["skipped"])))
    labels = examples.ds.data.column("labels")
    # target tokens: labels that are not IGNORE, position 0 of each example excluded (chunk by chunk: the
    # memory-mapped column is never copied whole)
    import pyarrow.compute as pc

    chunks = labels.chunks if hasattr(labels, "chunks") else [labels]
    targets = sum(int(pc.sum(pc.not_equal(c.flatten(), IGNORE)).as_py() or 0) for c in chunks)
    total.target_tokens = targets - _first_targets(labels)
    if examples.pairs:  # the rejected rows' targets count too
        rejected = examples.ds.data.column("rejected_labels")
        chunks = rejected.chunks if hasattr(rejected, "chunks") else [rejected]
        total.target_tokens += sum(int(pc.sum(pc.not_equal(c.flatten(), IGNORE)).as_py() or 0)
                                   for c in chunks) - _first_targets(rejected)
    return total, meta["sets"]


def _first_targets(labels: Any) -> int:
    import pyarrow.compute as pc

    firsts = pc.list_element(labels, 0)
    return int(pc.sum(pc.not_equal(firsts, IGNORE)).as_py() or 0)


def _still_preparing(ranks: list[int], wait_minutes: float, cache_dir: Path) -> str:
    return (f"data: rank(s) {ranks} (local rank 0 of their node) still tokenising after {wait_minutes:g} minutes "
            f"(parallel.timeout_minutes); fill the cache {cache_dir} before launching (`fsdptrain data CONFIG` on each "
            "node, or once when data.cache_dir is shared) or raise parallel.timeout_minutes")


def prepare(specs: list[formats.Spec], tok: PreTrainedTokenizerBase, s: Settings, cache_dir: Path, rank: int,
            local_rank: int, overwrite: bool, log: Callable[[str], None],
            wait_minutes: float = 30.0) -> tuple[TokenizedExamples, TokenizeStats, list[dict], bool]:
    """(examples, total stats, per-data-set stats, cache hit). Collective when a process group is up: local rank
    0 of each node prepares, the others wait for it up to `wait_minutes` (parallel.timeout_minutes)."""
    key, error, hit, failure = None, None, False, None
    if local_rank == 0:
        try:
            key = cache_key(specs, tok, s)
            target = cache_dir / key
            hit = (target / "meta.json").is_file() and not overwrite
            if not hit:
                if overwrite:
                    shutil.rmtree(target, ignore_errors=True)
                build(specs, tok, s, target, log)
        except UserError as e:
            error = str(e)
        except Exception as e:  # a bug: let the others stop too, then re-raise it here with its traceback
            error, failure = f"data preparation failed on rank {rank} ({type(e).__name__}: {e})", e
    if dist.is_initialized() and dist.get_world_size() > 1:  # the store, not a collective: see exchange_by_store
        answers = exchange_by_store(json.dumps([key, error, hit]), wait_minutes * 60,
                                    lambda ranks: _still_preparing(ranks, wait_minutes, cache_dir))
        gathered = [tuple(json.loads(a)) for a in answers]
    else:
        gathered = [(key, error, hit)]
    if failure is not None:
        raise failure
    errors = [e for _, e, _ in gathered if e]
    if errors:
        raise UserError(errors[0])
    key, _, hit = gathered[rank - local_rank] if len(gathered) > 1 else gathered[0]
    examples = TokenizedExamples(cache_dir / key)
    meta = json.loads((cache_dir / key / "meta.json").read_text())
    total, per_set = stats_from_meta(meta, examples)
    return examples, total, per_set, hit
