"""The package as a user installs and starts it: the optional extras bring what they say, and the commands that
need no model (help, `config`, argument mistakes) answer without importing torch or transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, env

# Runs one command in a fresh interpreter and prints which heavy modules it imported, as JSON on stderr's last line.
PROBE = """
import json, sys
from fsdptrain import cli
try:
    cli.main(sys.argv[1:], prog_name="fsdptrain")
except SystemExit as e:
    code = e.code
else:
    code = 0
print(json.dumps({"code": code, "imported": sorted(m for m in ("torch", "transformers") if m in sys.modules)}),
      file=sys.stderr)
"""


def test_the_plot_extra_brings_matplotlib_only():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["plot"] == ["matplotlib>=3.7"]
    assert extras["wandb"] == ["wandb>=0.19"]
    assert extras["mlflow"] == ["mlflow-skinny>=2.16"]


@pytest.mark.parametrize("args, code", [
    (["--help"], 0),
    (["train", "--help"], 0),
    (["config"], 0),
    (["config", "--dump", "train.lr=0.5"], 0),
    (["config", "train.lerning_rate=1"], 2),  # a config mistake
    (["train", "--bogus"], 2),  # click's usage error
    (["eval"], 2),  # a missing argument
])
def test_commands_without_a_model_do_not_import_torch(args, code):
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60,
                          env=env(), cwd=REPO)
    result = json.loads(proc.stderr.strip().splitlines()[-1])
    assert result == {"code": code, "imported": []}, proc.stderr[-2000:]
