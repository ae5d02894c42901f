"""The table of docs/templates.md: every chat template in ../shared/chat_templates on the fixed conversations.

Each template is paired with one of ../shared/tokenizers (its model's vocabulary where we have it) and checked by
fsdptrain.data.templatecheck (what it trains, from the tokens up, or the one-line reason it is refused).

Usage:
  python benchmarks/template_table.py [--shared ../shared] [--write]
--write replaces the table in docs/templates.md (between its two marker lines); tests/test_templates.py checks
that the docs hold exactly this output.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fsdptrain.data.templatecheck import run_all, table

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- table: benchmarks/template_table.py -->", "<!-- end of table -->"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--write", action="store_true", help="replace the table in docs/templates.md")
    args = ap.parse_args()
    results = run_all(args.shared / "chat_templates", args.shared / "tokenizers")
    text = table(results)
    works = sum(all(o.cell().startswith("ok") for o in outcomes.values()) for _, outcomes in results.values())
    summary = f"{works} of {len(results)} templates render all four conversations right.\n"
    if not args.write:
        print(text + "\n" + summary, end="")
        return
    doc = REPO / "docs" / "templates.md"
    body = doc.read_text()
    head, rest = body.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    tmp = doc.with_suffix(".md.tmp")
    tmp.write_text(f"{head}{BEGIN}\n{summary}\n{text}{END}{tail}")
    tmp.replace(doc)
    print(f"wrote {doc} ({summary.strip()})")


if __name__ == "__main__":
    main()
