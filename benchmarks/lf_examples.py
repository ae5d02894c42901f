"""LLaMA-Factory's own example training YAMLs and DeepSpeed JSONs through fsdptrain's translation.

Every YAML under the repository's examples/ that is a LLaMA-Factory (0.9-style) training config (its top level
holds model_name_or_path and stage) is loaded the way `fsdptrain train FILE` loads it (lfconfig.translate, then
the strict fsdptrain loading and validation; no model, no data, no training), and the fsdptrain YAML that
`fsdptrain config --from-llamafactory FILE` writes is loaded again and must give the same config. Each DeepSpeed
JSON of examples/deepspeed is put into one base YAML (--base) and translated the same way. The table says for
each file: converted (and what it became) or refused (fsdptrain's one-line reason).

Left out, and counted: YAMLs without `stage` (inference and merge/export configs: no training), LLaMA-Factory
v1's configs (examples/v1: another key layout, a `model:` section), and YAMLs that are not LLaMA-Factory configs
(accelerate launcher configs, token lists).

The files are read from the repository, never copied into this one: --lf-repo is a checkout (a folder with
examples/) or a bare git directory (its HEAD's examples/ is unpacked into a temporary folder). LLaMA-Factory
resolves `deepspeed: examples/deepspeed/...` against the working folder, its repository's root; so does this.

Usage:
  PYTHONPATH=. python benchmarks/lf_examples.py --lf-repo /work/.mirror/hiyouga+LLaMA-Factory/repo
  PYTHONPATH=. python benchmarks/lf_examples.py --lf-repo ... --doc docs/llamafactory.md

With --doc the table also replaces the one between `<!-- examples: benchmarks/lf_examples.py -->` and
`<!-- end of examples -->` in that file (docs/llamafactory.md), so the doc is this script's output, never edited
by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fsdptrain.config.llamafactory import lf_yaml, translate  # noqa: E402
from fsdptrain.config.schema import load_config  # noqa: E402
from fsdptrain.core.errors import UserError  # noqa: E402
from fsdptrain.core.files import read_yaml, write_atomic  # noqa: E402


def examples_root(lf_repo: Path, scratch: Path) -> Path:
    """A folder whose examples/ holds LLaMA-Factory's examples: the checkout itself, or HEAD of a bare repo
    unpacked into `scratch`."""
    if (lf_repo / "examples").is_dir():
        return lf_repo
    tar = subprocess.run(["git", "--git-dir", str(lf_repo), "archive", "HEAD", "examples"], check=True,
                         capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(scratch, filter="data")
    return scratch


def kind(path: Path) -> str:
    """'train' for a LLaMA-Factory training YAML, else why it is left out."""
    if "v1" in path.parts:
        return "LLaMA-Factory v1 config (another key layout)"
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return "not YAML"
    if not isinstance(raw, dict) or "model_name_or_path" not in raw:
        return "not a LLaMA-Factory config (launcher settings, token lists)"
    if "stage" not in raw:
        return "no stage: inference or merge/export config"
    return "train"


def what(cfg) -> str:
    """A short description of the loaded config."""
    p = cfg.parallel
    bits = [cfg.finetune.method, p.precision, "reshard" if p.reshard_after_forward else "no reshard"]
    bits += [x for x, on in (("cpu_offload", p.cpu_offload), ("optimizer_offload", p.optimizer_offload),
                             ("packing", cfg.data.packing)) if on]
    if cfg.train.objective == "dpo":
        bits.append(f"dpo {cfg.preference.loss}")
    elif cfg.train.objective != "sft":
        bits.append(cfg.train.objective)
    return f"{', '.join(bits)}; template {cfg.data.template}"


def convert(rel: str) -> tuple[bool, str]:
    """(converted, description or the one-line refusal) for one LLaMA-Factory YAML, relative to the cwd."""
    try:
        cfg = load_config(rel, quiet=True)
        written = lf_yaml(rel)
    except UserError as e:
        return False, str(e).removeprefix(f"{rel}: ")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        fh.write(written)
    try:
        again = load_config(fh.name, quiet=True)
    except UserError as e:
        return False, f"the written fsdptrain YAML does not load: {e}"
    finally:
        os.unlink(fh.name)
    if dataclasses.asdict(again) != dataclasses.asdict(cfg):
        return False, "the written fsdptrain YAML loads as a different config"
    notes = [f"{key}: {why}" for key, why in translate(read_yaml(rel), rel).ignored if key == "deepspeed"]
    return True, "; ".join([what(cfg), *notes])


BEGIN, END = "<!-- examples: benchmarks/lf_examples.py -->", "<!-- end of examples -->"


def table(rows: list[tuple[str, bool, str]]) -> list[str]:
    """The Markdown table of (file, converted, what it became / why refused) rows."""
    return ["| file | result | what it became / why refused |", "| --- | --- | --- |",
            *(f"| {name} | {'converted' if ok else 'refused'} | {why.replace('|', '/')} |" for name, ok, why in rows)]


def replace_table(doc: str, lines: list[str]) -> str:
    """`doc` with the block between BEGIN and END replaced by `lines`."""
    start, end = doc.find(BEGIN), doc.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"--doc: no {BEGIN} ... {END} block to replace")
    return doc[: start + len(BEGIN)] + "\n" + "\n".join(lines) + "\n" + doc[end:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lf-repo", type=Path, required=True, help="LLaMA-Factory checkout or bare git directory")
    ap.add_argument("--base", default="examples/train_lora/qwen3_lora_sft.yaml",
                    help="the YAML each DeepSpeed JSON is put into")
    ap.add_argument("--doc", type=Path, help="also write the table into this Markdown file's examples block")
    args = ap.parse_args()
    doc = args.doc.resolve() if args.doc is not None else None  # before the chdir below
    with tempfile.TemporaryDirectory() as scratch:
        root = examples_root(args.lf_repo.resolve(), Path(scratch))
        os.chdir(root)  # LLaMA-Factory's working folder: deepspeed paths are relative to it
        rows, left_out = [], Counter()
        for path in sorted(Path("examples").rglob("*.y*ml")):
            k = kind(path)
            if k != "train":
                left_out[k] += 1
                continue
            rows.append((str(path), *convert(str(path))))
        base = yaml.safe_load(Path(args.base).read_text())
        for ds in sorted(Path("examples/deepspeed").glob("*.json")):
            probe = Path(scratch) / f"with_{ds.stem}.yaml"
            probe.write_text(yaml.safe_dump({**base, "deepspeed": str(ds)}))
            ok, why = convert(str(probe))
            rows.append((f"{ds} (in {Path(args.base).name})", ok, why.removeprefix(f"{probe}: ")))
    lines = table(rows)
    print("\n".join(lines))
    if doc is not None:
        write_atomic(doc, replace_table(doc.read_text(), lines))
    n_ok = sum(1 for _, ok, _ in rows if ok)
    print(f"\n{len(rows)} files: {n_ok} converted, {len(rows) - n_ok} refused")
    for why, n in sorted(left_out.items()):
        print(f"left out: {n} ({why})")


if __name__ == "__main__":
    main()
