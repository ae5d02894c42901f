"""fsdptrain's tokenised examples vs LLaMA-Factory's own supervised preprocessing, record by record.

For each case (a LLaMA-Factory demo data set, a tokenizer from ../shared/tokenizers, the template) both sides
encode every record at cutoff 2048 and the input_ids and labels are compared; "same targets" counts the records
whose trained tokens (each run of labelled tokens, in order) are the same, whatever the prompt tokens.
fsdptrain's `data.template: auto` is compared with LLaMA-Factory given no template (it then parses the
tokenizer's chat template). A record fsdptrain refuses (a template that would drop tool calls) is counted as
refused.

LLaMA-Factory runs in its own virtual environment, so this project's torch stays untouched:
  python -m venv --system-site-packages /tmp/lf/venv
  /tmp/lf/venv/bin/pip install --no-deps llamafactory==0.9.5 && /tmp/lf/venv/bin/pip install omegaconf
  # its template module imports torchaudio, unused for text: an empty stand-in package is enough
  mkdir -p /tmp/lf/stubs/torchaudio && touch /tmp/lf/stubs/torchaudio/__init__.py
The demo data (alpaca_en_demo.json, glaive_toolcall_en_demo.json, dataset_info.json) is in LLaMA-Factory's
repository, folder data/.

Usage:
  python benchmarks/lf_parity.py --lf-python /tmp/lf/venv/bin/python --lf-stubs /tmp/lf/stubs --data DIR
  (--only qwen qwen3 ...: only the cases of these data.template values)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CUTOFF = 2048
CASES = [  # (data set, tokenizer, LLaMA-Factory template (None: parsed from the tokenizer), fsdptrain data.template)
    ("alpaca_en_demo", "qwen2.5", None, "auto"),
    ("alpaca_en_demo", "llama3.1", None, "auto"),
    ("glaive_toolcall_en_demo", "qwen2.5", "qwen", "auto"),
    ("glaive_toolcall_en_demo", "llama3.1", None, "auto"),
    ("glaive_toolcall_en_demo", "llama3.1", "llama3", "llama3"),
    # LLaMA-Factory's template names (data.template: qwen, ...: see docs/llamafactory.md)
    ("alpaca_en_demo", "qwen2.5", "qwen", "qwen"),
    ("glaive_toolcall_en_demo", "qwen2.5", "qwen", "qwen"),
    ("alpaca_en_demo", "qwen3", "qwen", "qwen"),
    ("alpaca_en_demo", "qwen3", "qwen3", "qwen3"),
    ("glaive_toolcall_en_demo", "qwen3", "qwen3", "qwen3"),
    ("alpaca_en_demo", "qwen3", "qwen3_nothink", "qwen3_nothink"),
    ("glaive_toolcall_en_demo", "qwen3", "qwen3_nothink", "qwen3_nothink"),
    ("glaive_toolcall_en_demo", "qwen3", "qwen", "qwen"),
    ("alpaca_en_demo", "qwen2.5", "chatml", "chatml"),
    ("alpaca_en_demo", "llama3.1", "llama3", "llama3"),
    ("alpaca_en_demo", "qwen2.5", "empty", "empty"),
    ("alpaca_en_demo", "llama3.1", "empty", "empty"),
    ("glaive_toolcall_en_demo", "qwen2.5", "empty", "empty"),
    ("alpaca_en_demo", "qwen2.5", "default", "default"),
    ("alpaca_en_demo", "llama3.1", "default", "default"),
    ("glaive_toolcall_en_demo", "qwen2.5", "default", "default"),
]


def lf_side(data: str, dataset: str, tokenizer: str, template: str | None, out: str) -> None:
    """Runs inside LLaMA-Factory's environment: its converter, template and supervised processor."""
    from llamafactory.data.converter import get_dataset_converter
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.data.processor import SupervisedDatasetProcessor
    from llamafactory.data.template import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments
    from transformers import AutoTokenizer

    args = DataArguments(template=template, cutoff_len=CUTOFF, dataset=[dataset], dataset_dir=data)
    tok = AutoTokenizer.from_pretrained(tokenizer)
    tmpl = get_template_and_fix_tokenizer(tok, args)
    (attr,) = get_dataset_list([dataset], data)
    raw = json.loads((Path(data) / attr.dataset_name).read_text())
    aligned = [get_dataset_converter(attr.formatting, attr, args)(r) for r in raw]
    batch = {k: [a[k] for a in aligned] for k in aligned[0]}
    proc = SupervisedDatasetProcessor(template=tmpl, tokenizer=tok, processor=None, data_args=args)
    enc = proc.preprocess_dataset(batch)
    with open(out, "w") as fh:
        for ids, labels in zip(enc["input_ids"], enc["labels"]):
            fh.write(json.dumps({"input_ids": ids, "labels": labels}) + "\n")


def ours(data: str, dataset: str, tokenizer: str, template: str) -> list:
    """fsdptrain's examples per record (None: the record was refused), through formats and encode."""
    from transformers import AutoTokenizer

    from fsdptrain.data import formats, sources
    from fsdptrain.data.encode import tokenize_record
    from fsdptrain.data.render import TemplateError
    from fsdptrain.data.tokenizer import apply_template

    tok = AutoTokenizer.from_pretrained(tokenizer)
    apply_template(tok, template)
    (spec,) = sources.resolve([dataset], data)
    rows, where = sources.read(spec)
    out = []
    for rec in formats.convert(spec, rows, where).records:
        try:
            examples, _ = tokenize_record(tok, rec, CUTOFF)
            out.append([(e.input_ids, e.labels) for e in examples])
        except TemplateError as e:
            out.append(str(e))
    return out


def trained(examples: list) -> list:
    """The trained tokens of a record's examples, each run of them apart: what the model learns to write."""
    runs: list = []
    for _, labels in examples:
        previous = -100
        for label in labels:
            if label != -100:
                if previous == -100:
                    runs.append([])
                runs[-1].append(label)
            previous = label
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lf-python", required=True, help="the python of an environment with llamafactory")
    ap.add_argument("--lf-stubs", default="", help="folder with the torchaudio stand-in")
    ap.add_argument("--data", required=True, help="folder with LLaMA-Factory's demo data and dataset_info.json")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--only", nargs="*", default=None, help="run only the cases with these fsdptrain data.template")
    ap.add_argument("--lf-side", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.lf_side:
        data, dataset, tokenizer, template, out = args.lf_side
        lf_side(data, dataset, tokenizer, None if template == "-" else template, out)
        return
    print("| data set | tokenizer | LLaMA-Factory template | data.template | identical | different | refused "
          "| same targets |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: |")
    for dataset, tokenizer, lf_template, template in CASES:
        if args.only is not None and template not in args.only:
            continue
        tok_dir = str(args.shared / "tokenizers" / tokenizer)
        with tempfile.NamedTemporaryFile(suffix=".jsonl") as fh:
            env = {**os.environ, "DISABLE_VERSION_CHECK": "1",
                   "PYTHONPATH": os.pathsep.join(p for p in (args.lf_stubs, os.environ.get("PYTHONPATH", "")) if p)}
            subprocess.run([args.lf_python, __file__, "--lf-python", args.lf_python, "--data", args.data,
                            "--lf-side", args.data, dataset, tok_dir, lf_template or "-", fh.name],
                           check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            theirs = [json.loads(line) for line in Path(fh.name).read_text().splitlines()]
        mine = ours(args.data, dataset, tok_dir, template)
        same = diff = refused = same_targets = 0
        for m, t in zip(mine, theirs):
            if isinstance(m, str):
                refused += 1
                continue
            if len(m) == 1 and (m[0][0], m[0][1]) == (t["input_ids"], t["labels"]):
                same += 1
            else:
                diff += 1
            same_targets += trained(m) == trained([(t["input_ids"], t["labels"])])
        assert len(mine) == len(theirs), (len(mine), len(theirs))
        print(f"| {dataset} | {tokenizer} | {lf_template or '(parsed)'} | {template} | {same} | {diff} | {refused} "
              f"| {same_targets} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
