"""docs/llamafactory.md's table of LLaMA-Factory's example YAMLs is benchmarks/lf_examples.py's output: the block
between its markers is in the script's format, so `lf_examples.py --doc` rewrites it (the script needs
LLaMA-Factory's repository, which the tests do not have: rerun it with --lf-repo after changing the translation)."""

from __future__ import annotations

import importlib.util

from tests.helpers import REPO


def load_script():
    spec = importlib.util.spec_from_file_location("lf_examples", REPO / "benchmarks" / "lf_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_doc_table_is_the_scripts_output_format():
    script = load_script()
    doc = (REPO / "docs" / "llamafactory.md").read_text()
    block = doc[doc.index(script.BEGIN) + len(script.BEGIN):doc.index(script.END)].strip().splitlines()
    rows = []
    for line in block[2:]:
        name, result, why = line.strip("| ").split(" | ", 2)
        assert result in ("converted", "refused"), line
        rows.append((name, result == "converted", why))
    assert script.table(rows) == block  # rendering the parsed rows gives the doc's lines back
    assert script.replace_table(doc, script.table(rows)) == doc
    assert script.replace_table("a\n" + script.BEGIN + "\nold\n" + script.END + "\nb", ["| x |"]) == \
        "a\n" + script.BEGIN + "\n| x |\n" + script.END + "\nb"
    converted = {name for name, ok, _ in rows if ok}
    assert {"examples/train_lora/qwen3_lora_dpo.yaml", "examples/train_lora/qwen3_lora_reward.yaml"} <= converted
