"""Shared test utilities: subprocess launchers and tiny Hugging Face model folders."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
         "tie_word_embeddings": True}
QWEN2 = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
         "tie_word_embeddings": False}


def env(**extra: str) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.setdefault("OMP_NUM_THREADS", "1")
    e.update(extra)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], timeout: float = 300, cwd: Path | None = None, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fsdptrain", *args], capture_output=True, text=True,
                          timeout=timeout, env=env(**extra_env), cwd=cwd)


def cli_inproc(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The CLI run inside the test process, for commands that end before any training starts (config errors,
    `config`, refusals): the same exit status, stdout and stderr as `run_cli` without the seconds an interpreter
    start-up with torch costs. Tests of what a whole process does (signals, tracebacks, torchrun) use run_cli."""
    from click.testing import CliRunner

    from fsdptrain.cli import main

    before = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        res = CliRunner().invoke(main, args, prog_name="fsdptrain", catch_exceptions=False)
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess(args, res.exit_code, res.stdout, res.stderr)


def torchrun(nproc: int, args: list[str], timeout: float = 600, **extra_env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(**extra_env))


def make_model_dir(path: Path, arch: dict, seed: int = 0) -> Path:
    """A tiny randomly initialised HF model + the built-in tokenizer, saved as safetensors (save_pretrained)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fsdptrain.data.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    fields = dict(arch)
    cfg = AutoConfig.for_model(fields.pop("model_type"), vocab_size=len(tok), **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # non-trivial norms, biases and persistent buffers, so wrong loading shows
        for _name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
        params = dict(model.named_parameters())
        for name, b in model.state_dict().items():  # e.g. DeepSeek-V3's router correction bias
            if b.is_floating_point() and name not in params:
                b.add_(torch.randn_like(b))
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]
