"""`fsdptrain data`: the data pipeline alone (no model, no GPU), to look at before a long run.

For each data set: records read, skipped and why, examples kept, truncated, extra rows (long documents cut,
turns re-rendered by the template), dropped for having no target left. Then the first N examples rendered with
their trained spans marked (green on a terminal, `[[...]]` otherwise), and with an output file one JSON line
per example: input_ids, labels, the source file and the record's number in it. A preference pair is shown as
its chosen and its rejected row, each with its response marked (and written with rejected_ids and
rejected_labels beside input_ids and labels); a KTO example as its own row (tagged desirable or undesirable)
and its KL row (written as kl_ids, kl_labels and desirable). Records are read, converted,
rendered and tokenised exactly as for training (the same functions, in process, no cache), and a template that
cannot render the data stops here with the same one-line error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..config.schema import Config
from ..core.errors import UserError
from . import formats, sources
from .cache import template_fix, template_label
from .encode import (
    IGNORE,
    Example,
    Feedback,
    Pair,
    PairError,
    TemplateError,
    TokenizeStats,
    tokenize_all,
    tokenize_record,
)
from .pipeline import check_objective, require_pairs_given
from .synthetic import generate
from .tokenizer import apply_template, load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

GREEN, RESET = "\x1b[32m", "\x1b[0m"
OPEN, CLOSE = "[[", "]]"


@dataclass
class Row:
    example: Example | Pair | Feedback
    source: str  # the file (or hub path) the record came from
    record: int  # its number there (0-based)


@dataclass
class SetReport:
    name: str
    stats: TokenizeStats = field(default_factory=TokenizeStats)

    def line(self) -> str:
        return f"data: '{self.name}': {self.stats.summary()}"


def collect(cfg: Config, tok: PreTrainedTokenizerBase) -> tuple[list[SetReport], list[Row]]:
    """Every data set's counts and examples, in order, as training would make them (before packing)."""
    d = cfg.data
    if not d.datasets:
        require_pairs_given(cfg)
        examples, st = tokenize_all(tok, generate(d.synthetic_task, d.synthetic_examples, cfg.seed), d.max_length,
                                    d.train_on_prompt, d.mask_history)
        return [SetReport(f"synthetic {d.synthetic_task}", st)], [Row(e, "synthetic", i)
                                                                    for i, e in enumerate(examples)]
    reports, rows = [], []
    specs = sources.resolve(d.datasets, d.dataset_dir)
    check_objective(cfg, specs)
    converted = []
    for n, spec in enumerate(specs):
        records, where = sources.read(spec)
        records, where = sources.sample(records, where, spec.num_samples, cfg.seed + n)
        if d.max_samples is not None:
            records, where = records[: d.max_samples], where[: d.max_samples]
        converted.append(formats.convert(spec, records, where))
    if any(spec.feedback for spec in specs):  # KTO: the KL responses over all data sets, as the cache does
        formats.assign_kl_responses([r for conv in converted for r in conv.records])
    for spec, conv in zip(specs, converted):
        report = SetReport(spec.name, TokenizeStats(reasons=dict(conv.skipped)))
        for rec, loc in zip(conv.records, conv.where):
            try:
                examples, st = tokenize_record(tok, rec, d.max_length, d.train_on_prompt, d.mask_history)
            except TemplateError as e:
                raise UserError(f"{loc}: {template_label(d.template)}: {e}; {template_fix(tok)}") from None
            except PairError as e:
                raise UserError(f"{loc}: {e}; raise data.max_length or shorten the record") from None
            st.read = 0
            report.stats.add(st)
            source, _, number = loc.rpartition(" record ")
            rows += [Row(e, source, int(number) if number.isdigit() else -1) for e in examples]
        report.stats.read = conv.read
        reports.append(report)
    return reports, rows


def marked(tok: PreTrainedTokenizerBase, ex: Example, color: bool) -> str:
    """The example's text with every trained span marked."""
    opening, closing = (GREEN, RESET) if color else (OPEN, CLOSE)
    out, run, trained = [], [], False
    for t, label in zip(ex.input_ids, ex.labels):
        if (label != IGNORE) != trained and run:
            text = tok.decode(run)
            out.append(f"{opening}{text}{closing}" if trained else text)
            run = []
        trained = label != IGNORE
        run.append(t)
    if run:
        text = tok.decode(run)
        out.append(f"{opening}{text}{closing}" if trained else text)
    return "".join(out)


def write_jsonl(rows: list[Row], out: str) -> None:
    """One JSON line per example, written to a temporary name and renamed; an existing file is not replaced."""
    path = Path(out)
    if path.exists():
        raise UserError(f"--out: {out} exists; give a new file name (fsdptrain never replaces a file it did not "
                        "write)")
    if not path.parent.is_dir():
        raise UserError(f"--out: {path.parent} is not a folder; create it or give another path")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            for r in rows:
                e = r.example
                first = e.chosen if isinstance(e, Pair) else e.example if isinstance(e, Feedback) else e
                line = {"input_ids": list(first.input_ids), "labels": list(first.labels)}
                if isinstance(e, Pair):
                    line.update(rejected_ids=list(e.rejected.input_ids), rejected_labels=list(e.rejected.labels))
                if isinstance(e, Feedback):
                    line.update(kl_ids=list(e.kl.input_ids), kl_labels=list(e.kl.labels), desirable=e.desirable)
                fh.write(json.dumps({**line, "source": r.source, "record": r.record}) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def preview(cfg: Config, show: int, out: Optional[str], color: bool, echo: Callable[[str], None] = print) -> None:
    tok = load_tokenizer(cfg.model.tokenizer, cfg.model.path, cfg.model.trust_remote_code)
    apply_template(tok, cfg.data.template)
    reports, rows = collect(cfg, tok)
    for r in reports:
        echo(r.line())
    if len(reports) > 1:
        total = TokenizeStats()
        for r in reports:
            total.add(r.stats)
        echo(f"data: total: {total.summary()}")
    for i, r in enumerate(rows[:show]):
        where = r.source if r.record < 0 else f"{r.source} record {r.record}"
        if isinstance(r.example, Pair):
            for side in ("chosen", "rejected"):
                e = getattr(r.example, side)
                echo(f"--- pair {i} {side} ({where}, {len(e.input_ids)} tokens, {e.n_targets} trained)")
                echo(marked(tok, e, color))
            continue
        if isinstance(r.example, Feedback):
            tag = "desirable" if r.example.desirable else "undesirable"
            for what, e in ((tag, r.example.example), ("KL row", r.example.kl)):
                echo(f"--- example {i} {what} ({where}, {len(e.input_ids)} tokens, {e.n_targets} scored)")
                echo(marked(tok, e, color))
            continue
        echo(f"--- example {i} ({where}, {len(r.example.input_ids)} tokens, {r.example.n_targets} trained)")
        echo(marked(tok, r.example, color))
    if out:
        write_jsonl(rows, out)
        echo(f"data: wrote {len(rows)} examples to {out}")
