"""Shared test utilities: subprocess launchers and tiny Hugging Face model folders."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
         "tie_word_embeddings": True}
QWEN2 = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
         "tie_word_embeddings": False}

# Tiny models of every family the matrix covers (tests/test_family_matrix.py), the config fields given to
# AutoConfig.for_model; vocab_size comes from the built-in tokenizer. Shared by the tests that build folders.
_TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 64, "pad_token_id": 0}  # phi3: default pad id > vocab
_MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}
_MLA = {"num_key_value_heads": 4, "head_dim": 8, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
        "v_head_dim": 8}  # latent attention: one kv head per head
FAMILIES = {
    "llama": {"model_type": "llama", **_TINY, "tie_word_embeddings": True},
    "qwen2": {"model_type": "qwen2", **_TINY, "tie_word_embeddings": False},
    "qwen3": {"model_type": "qwen3", **_TINY, "head_dim": 8},
    "mistral": {"model_type": "mistral", **_TINY, "sliding_window": 8},  # shorter than the examples: it bites
    "gemma": {"model_type": "gemma", **_TINY, "head_dim": 8},
    "gemma2": {"model_type": "gemma2", **_TINY, "head_dim": 8, "sliding_window": 8},
    "gemma3_text": {"model_type": "gemma3_text", **_TINY, "head_dim": 8, "sliding_window": 8},
    "phi3": {"model_type": "phi3", **_TINY},
    "olmo2": {"model_type": "olmo2", **_TINY},
    "granite": {"model_type": "granite", **_TINY, "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                "logits_scaling": 2.0, "attention_multiplier": 0.2},
    "cohere": {"model_type": "cohere", **_TINY, "logit_scale": 0.5},
    "starcoder2": {"model_type": "starcoder2", **_TINY, "sliding_window": 8},
    "mixtral": {"model_type": "mixtral", **_TINY, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"model_type": "qwen3_moe", **_TINY, **_MOE, "head_dim": 8, "num_experts": 4,
                  "decoder_sparse_step": 1, "mlp_only_layers": []},
    "olmoe": {"model_type": "olmoe", **_TINY, "num_experts": 4, "num_experts_per_tok": 2},
    "deepseek_v3": {"model_type": "deepseek_v3", **_TINY, **_MOE, "num_key_value_heads": 4, "n_routed_experts": 4,
                    "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1,
                    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
                    "v_head_dim": 8},
    "gpt_oss": {"model_type": "gpt_oss", **_TINY, "head_dim": 8, "num_local_experts": 4, "num_experts_per_tok": 2,
                "sliding_window": 8},
    # issue 26's families: tests/tiny.py's fields, cut to one layer of each kind (2 layers where that is enough)
    "kimi_linear": {"model_type": "kimi_linear", **_TINY, **_MLA, "num_experts": 4, "num_experts_per_token": 2,
                    "num_shared_experts": 1, "linear_head_dim": 8, "linear_num_heads": 4, "num_expert_group": 2,
                    "topk_group": 1, "layer_types": ["linear_attention", "full_attention"],
                    "mlp_layer_types": ["dense", "sparse"]},
    "minimax_m2": {"model_type": "minimax_m2", **_TINY, "head_dim": 8, "num_local_experts": 4,
                   "num_experts_per_tok": 2},
    "nemotron_h": {"model_type": "nemotron_h", **_TINY, **_MOE, "head_dim": 8, "n_routed_experts": 4,
                   "n_shared_experts": 1, "moe_shared_expert_intermediate_size": 32, "mamba_num_heads": 4,
                   "mamba_head_dim": 16, "ssm_state_size": 8, "n_groups": 1, "chunk_size": 8, "n_group": 2,
                   "topk_group": 1, "layers_block_type": ["linear_attention", "moe", "full_attention", "mlp"]},
    "exaone_moe": {"model_type": "exaone_moe", **_TINY, **_MOE, "num_experts": 4, "num_shared_experts": 1,
                   "sliding_window": 8, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1,
                   "layer_types": ["sliding_attention", "full_attention"], "mlp_layer_types": ["dense", "sparse"]},
    "bailing_hybrid": {"model_type": "bailing_hybrid", **_TINY, **_MLA, "num_experts": 4, "num_experts_per_token": 2,
                       "num_shared_experts": 1, "linear_head_dim": 8, "linear_num_heads": 4, "num_expert_group": 2,
                       "topk_group": 1, "layer_group_size": 2, "first_k_dense_replace": 1,
                       "layer_types": ["linear_attention", "full_attention"], "mlp_layer_types": ["dense", "sparse"],
                       "expert_swiglu_limit_list": [0, 0], "share_expert_swiglu_limit_list": [0, 0]},
    "kolibri1": {"model_type": "kolibri1", **_TINY, **_MOE, "head_dim": 8, "num_local_experts": 4,
                 "shared_expert_intermediate_size": 32, "sliding_window": 8,
                 "layer_types": ["sliding_attention", "full_attention"]},
    "glm_moe_dsa": {"model_type": "glm_moe_dsa", **_TINY, **_MOE, **_MLA, "q_lora_rank": 16, "n_routed_experts": 4,
                    "n_shared_experts": 1, "index_head_dim": 8, "index_n_heads": 2, "index_topk": 8, "n_group": 2,
                    "topk_group": 1, "first_k_dense_replace": 1, "layer_types": ["indexed_attention"] * 2,
                    "mlp_layer_types": ["dense", "sparse"], "indexer_types": ["full", "full"]},
    "mamba": {"model_type": "mamba", "hidden_size": 32, "intermediate_size": 64, "state_size": 8,
              "time_step_rank": 4, "num_hidden_layers": 2, "pad_token_id": 0},
    "falcon_mamba": {"model_type": "falcon_mamba", "hidden_size": 32, "intermediate_size": 64, "state_size": 8,
                     "time_step_rank": 4, "num_hidden_layers": 2, "pad_token_id": 0},
    "deepseek_v4": {"model_type": "deepseek_v4", **_TINY, **_MOE, "head_dim": 8, "n_routed_experts": 4,
                    "n_shared_experts": 1, "q_lora_rank": 16, "o_lora_rank": 16, "qk_rope_head_dim": 8,
                    "index_head_dim": 8, "index_n_heads": 2, "index_topk": 8, "sliding_window": 8, "o_groups": 2,
                    "layer_types": ["heavily_compressed_attention", "compressed_sparse_attention"],
                    "mlp_layer_types": ["hash_moe", "moe"]},
    "doge": {"model_type": "doge", **_TINY, "keep_window_size": 8},
    # checkpoints converted by transformers while loading: q, k and v fused in one tensor (`Split`), the experts'
    # gate and up rows alternating (`Interleave`), weights stored transposed (`Transpose`)
    "sarvam_moe": {"model_type": "sarvam_moe", **_TINY, **_MOE, "head_dim": 8, "n_routed_experts": 4,
                   "n_shared_experts": 1, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1},
    "inkling2_text": {"model_type": "inkling2_text", "hidden_size": 32, "moe_intermediate_size": 32,
                      "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "n_routed_experts": 4,
                      "num_experts_per_tok": 2, "max_position_embeddings": 64, "sliding_window_size": 8,
                      "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 8,
                      "num_hidden_layers": 2, "layer_types": ["hybrid_sliding", "hybrid"], "unpadded_vocab_size": 100,
                      "eos_token_id": 2, "tie_word_embeddings": False},
    # its router and shared expert stored [in, out] (`Transpose`d by transformers while loading)
    "ergo": {"model_type": "ergo", **_TINY, "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2,
             "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"],
             "mlp_layer_types": ["dense", "sparse"]},
}


def env(**extra: str) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.setdefault("OMP_NUM_THREADS", "1")
    e.setdefault("PYTHONFAULTHANDLER", "1")  # a hung run's stacks on SIGABRT (hung_report)
    # launch/torchrun.sh's log files (launch/slurm.sbatch would put them in the checkout): one folder for the tests
    e.setdefault("FSDPTRAIN_LAUNCH_LOG", os.path.join(tempfile.gettempdir(), "fsdptrain-test-launch-logs"))
    e.update(extra)
    return e


def hung_report(marks: list[str], wait: float = 3.0) -> str:
    """For a launched run that did not finish: every process whose command line holds one of `marks` (an
    output_dir: the launcher, torchrun and its workers, which torchrun starts in sessions of their own) gets
    SIGABRT, so that Python's faulthandler (PYTHONFAULTHANDLER=1, set by `env`) writes each thread's stack into
    torchrun's log file; then the tail of every log file the output named. Those processes are then killed."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and int(proc.name) != os.getpid() and any(m in cmd for m in marks):
            pids.append((int(proc.name), cmd[:160]))
    for pid, cmd in pids:
        if "fsdptrain.launch" in cmd:
            continue  # the launcher's follower: it shows the log, which holds the stacks
        try:
            os.kill(pid, signal.SIGABRT)
        except OSError:
            pass
    time.sleep(wait)
    for pid, _ in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    report = ["processes still running: " + "; ".join(f"{pid} {cmd}" for pid, cmd in pids)]
    return "\n".join(report)


def log_tails(out: str, chars: int = 6000) -> str:
    """The end of each launch log file named in a launcher's output (`> PATH` in its exec line)."""
    tails = []
    for path in sorted(set(re.findall(r"(\S+fsdptrain-launch-\S+\.log)", out))):
        try:
            tails.append(f"--- {path}\n{Path(path).read_text(errors='replace')[-chars:]}")
        except OSError as e:
            tails.append(f"--- {path}: {e}")
    return "\n".join(tails)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], timeout: float = 300, cwd: Path | None = None, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fsdptrain", *args], capture_output=True, text=True,
                          timeout=timeout, env=env(**extra_env), cwd=cwd)


def cli_inproc(args: list[str], cwd: Path | None = None, **extra_env: str) -> subprocess.CompletedProcess:
    """The CLI run inside the test process, for commands that end before any training starts (config errors,
    `config`, refusals): the same exit status, stdout and stderr as `run_cli` without the seconds an interpreter
    start-up with torch costs. Tests of what a whole process does (signals, tracebacks, torchrun) use run_cli."""
    from click.testing import CliRunner

    from fsdptrain import cli

    before = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        res = CliRunner(env=extra_env or None).invoke(cli.main, args, prog_name="fsdptrain", catch_exceptions=False)
    finally:
        os.chdir(before)
        cli.crash_dir = None  # set by `train` for its crash reports; a process would end here
    return subprocess.CompletedProcess(args, res.exit_code, res.stdout, res.stderr)


def torchrun(nproc: int, args: list[str], timeout: float = 600, **extra_env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(**extra_env))
    if proc.returncode != 0 and "Fatal Python error" in proc.stderr:
        # a rank crashed (faulthandler's report, PYTHONFAULTHANDLER=1): the tests show stderr's tail, which
        # torchrun fills with its own report; repeat the crashed rank's stacks at the end
        at = proc.stderr.index("Fatal Python error")
        proc.stderr += "\n--- the first crash, again ---\n" + proc.stderr[at:at + 2500]
    return proc


def make_model_dir(path: Path, arch: dict, seed: int = 0, dtype: torch.dtype = torch.float32,
                   max_shard_size: str | None = None) -> Path:
    """A tiny randomly initialised HF model + the built-in tokenizer, saved as safetensors (save_pretrained, in
    `dtype`, in files of at most `max_shard_size` when given)."""
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
    model.to(dtype).save_pretrained(str(path), **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tok.save_pretrained(str(path))
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def first_block_saved_bytes(model, b: int, s: int) -> int:
    """Bytes autograd saves for backward in the first decoder block of `model` (a transformers causal LM) on a
    [b, s] batch, parameters and rotary tables left out: what the estimator's per-block activation term predicts."""
    x = model.model.embed_tokens(torch.randint(0, 100, (b, s))).detach().requires_grad_()
    pos = torch.arange(s)[None]
    cos_sin = model.model.rotary_emb(x, pos)
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *cos_sin]}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model.layers[0](x, position_embeddings=cos_sin, position_ids=pos)
    return sum(saved.values())
