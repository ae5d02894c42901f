"""The family matrix: every Hugging Face family fsdptrain supports loads, trains and exports exactly.

The 17 first families, then the 11 that issue 26's sweep found wrong (tests/test_families.py checks each cause in
one process; zamba2, refused, is asserted there).

One torchrun launch (2 ranks, gloo, fp32; tests/workers/family_matrix.py) runs every family through the trainer's
own `setup` and `loop` from a folder written by `save_pretrained` (plus one folder in several safetensors files and
one in bf16): 3 optimizer steps, a checkpoint and the training-end export. Here, per family, against transformers:
- every parameter and buffer right after loading equals `from_pretrained`'s;
- step 1's loss equals transformers' own loss (model(input_ids, labels=...)) on the same batch (1e-5);
- the 3 step losses on 2 ranks equal a plain single-process PyTorch loop (tests/reference.py: AdamW, the same
  schedule and clipping, on the unsharded transformers model) on the same global batches (1e-5): the 1-rank
  computation is this independent loop, not fsdptrain on one rank, so a mistake shared by both world sizes shows;
- both exports (the training-end one and `fsdptrain export` of the checkpoint) hold exactly the keys, shapes,
  dtypes and values `save_pretrained` writes for the trained weights (MoE experts one by one, in the hub's layout)
  and reload with no missing or unexpected key and the trained model's logits (1e-5);
- packed loss equals unpacked where the packing check allows packing; where it refuses, its one line.
docs/families.md is this matrix in a table.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from tests.helpers import FAMILIES, make_model_dir, torchrun
from tests.reference import HYPER, reference_run

pytestmark = pytest.mark.slow  # see docs/testing.md: the quick loop is -m "not slow"

STEPS = 3
N_EXAMPLES, LENGTH = 4, 16  # one global batch of every example per step: 2 ranks x micro-batch 2
# transformers refuses sdpa for these
EAGER = {"gemma2", "gpt_oss", "mamba", "falcon_mamba", "deepseek_v4", "inkling2_text"}
EXTRA = {  # folder variants: name -> (family, save_pretrained options)
    "mixtral-sharded": ("mixtral", {"max_shard_size": "40KB"}),  # experts of one layer spread over files
    "qwen2-bf16": ("qwen2", {"dtype": torch.bfloat16}),
}
CASES = [*FAMILIES, *EXTRA]
MOE = {"mixtral", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "kimi_linear", "minimax_m2", "nemotron_h",
       "exaone_moe", "bailing_hybrid", "kolibri1", "glm_moe_dsa", "deepseek_v4", "sarvam_moe", "inkling2_text",
       "ergo"}
PER_EXPERT = re.compile(r"\.experts\.\d+\.")  # save_pretrained's layout: one tensor per expert
FUSED_EXPERTS = {"gpt_oss", "inkling2_text", "ergo"}  # whose hub layout stores a layer's experts in one tensor
# `fsdptrain export` of the run's checkpoint too (the training-end export covers every case; both write through
# the same save_groups / to_saved_layout, and a DCP save costs ~1 s a case here): the first MoE families, those that
# refuse sdpa (the export's model skeleton must be built with the checkpoint's attention implementation) and
# minimax_m2 (a persistent buffer saved under a renamed key).
FROM_CHECKPOINT = {"mixtral", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "gemma2", "mamba", "falcon_mamba",
                   "deepseek_v4", "minimax_m2"}
NO_PACKING = {  # the packing check's refusal, asserted word for word up to the measured difference
    name: f"data.packing: {name} does not keep packed examples apart (packed logits differ from the examples run "
          "alone by "
    # gpt_oss's mask builder ignores position_ids; the others' linear-attention / state-space / compressed
    # attention layers (inkling2_text: short convolutions over the row) carry state across the row whatever
    # position_ids say
    for name in ("gpt_oss", "kimi_linear", "nemotron_h", "bailing_hybrid", "mamba", "falcon_mamba", "deepseek_v4",
                 "inkling2_text")
}
# The reference loop trains on cross-entropy alone, so the MoE router's auxiliary loss is off here; the objective
# with it is checked against transformers' own outputs.loss in tests/test_moe_training.py.
TRAIN = {"router_aux_loss_coef": 0,
         "lr": HYPER["lr"], "warmup_steps": HYPER["warmup"], "schedule": "cosine", "min_lr_ratio": HYPER["min_ratio"],
         "weight_decay": HYPER["wd"], "max_grad_norm": HYPER["clip"],
         "adam_betas": f"[{HYPER['betas'][0]},{HYPER['betas'][1]}]"}


def family(case: str) -> str:
    return EXTRA[case][0] if case in EXTRA else case


def attn(case: str) -> str:
    return "eager" if family(case) in EAGER else "sdpa"


def token_rows(n: int, length: int, seed: int, vocab: int = 100) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~5x faster than two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """Every case's folder, then one launch that trains them all; returns the root."""
    root = tmp_path_factory.mktemp("matrix")
    cases = []
    for i, case in enumerate(CASES):
        fam, extra = (EXTRA[case] if case in EXTRA else (case, {}))
        folder = make_model_dir(root / "folders" / case, FAMILIES[fam], seed=i, **extra)
        cases.append({"name": case, "folder": str(folder), "attn": attn(case), "out": str(root / case),
                      "checkpoint": case in FROM_CHECKPOINT})
    spec = {"cases": cases, "examples": token_rows(N_EXAMPLES, LENGTH, 0), "probe": token_rows(2, 12, 1),
            "max_steps": STEPS, "train": TRAIN}
    (root / "spec.json").write_text(json.dumps(spec))
    r = torchrun(2, ["-m", "tests.workers.family_matrix", str(root / "spec.json")], timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return root


def hf_model(folder: Path, case: str, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation=attn(case),
                                                **kw)


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def save_pretrained_oracle(case: str, folder: Path, trained: dict, dest: Path) -> dict[str, torch.Tensor]:
    """What transformers' save_pretrained writes for the trained weights (given in its in-memory names)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)), dtype=torch.float32,
                                             attn_implementation=attn(case))
    model.load_state_dict(trained, strict=True)
    model.save_pretrained(str(dest))
    return folder_tensors(dest)


def same_files(exported: Path, oracle: dict) -> None:
    written = folder_tensors(exported)
    assert sorted(written) == sorted(oracle), (exported, sorted(set(written) ^ set(oracle)))
    for key, t in oracle.items():
        assert written[key].dtype == t.dtype and written[key].shape == t.shape, key
        assert torch.equal(written[key], t), key


def check_reload(case: str, exported: Path, probe_ids: torch.Tensor, trained_logits: torch.Tensor) -> None:
    model, loading = hf_model(exported, case, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"], (exported, loading)
    with torch.no_grad():
        logits = model.eval()(input_ids=probe_ids).logits
    assert (logits - trained_logits).abs().max().item() < 1e-5, exported


@pytest.mark.parametrize("case", CASES)
def test_family(matrix, case, tmp_path):
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from fsdptrain.cli import main
    from fsdptrain.data.encode import Example

    out = matrix / case
    folder = matrix / "folders" / case
    result = json.loads((out / "result.json").read_text())
    assert "refused_at_start" not in result, result  # no family of the matrix is refused today

    # loading: every parameter and every buffer (persistent or recomputed) equals from_pretrained's
    ref = hf_model(folder, case).eval()
    loaded = load_file(str(out / "loaded.safetensors"))
    theirs = {**dict(ref.named_parameters()), **{f"buffer.{k}": b for k, b in ref.named_buffers()}}
    assert sorted(loaded) == sorted(theirs)
    for key, t in theirs.items():
        assert torch.equal(loaded[key], t.detach()), key
    experts = {k: list(loaded[k].shape) for k in loaded if ".experts." in k}
    assert bool(experts) == (family(case) in MOE)
    if family(case) in MOE:  # 4 experts over 2 ranks: each rank holds (and read) 2, whole
        assert any(PER_EXPERT.search(k) for k in folder_tensors(folder)) == (family(case) not in FUSED_EXPERTS)
        for rank_shapes in result["local_experts"]:
            assert rank_shapes == {k: [s[0] // 2, *s[1:]] for k, s in experts.items()}, rank_shapes

    # step 1 = transformers' own loss on the same batch; 3 steps on 2 ranks = a plain one-process loop
    rows = json.loads((matrix / "spec.json").read_text())["examples"]
    ids = torch.tensor(rows)
    with torch.no_grad():
        hf_loss = ref(input_ids=ids, labels=ids).loss.item()
    losses = result["losses"]
    assert len(losses) == STEPS
    assert abs(losses[0] - hf_loss) < 1e-5, (losses[0], hf_loss)
    examples = [Example(r, r) for r in rows]
    ref_losses, _ = reference_run(copy.deepcopy(ref).train(), examples, [list(range(N_EXAMPLES))] * STEPS, STEPS)
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < 1e-5, (losses, ref_losses)

    # packing: exact where allowed, refused in one line where not
    packing = result["packing"]
    if family(case) in NO_PACKING:
        assert packing.get("refused", "").startswith(NO_PACKING[family(case)]), packing
        assert packing["refused"].endswith("); set data.packing=false") and "\n" not in packing["refused"]
    else:
        assert "refused" not in packing, packing
        targets = 8 + 6  # two examples of 9 and 7 tokens
        assert abs(packing["packed"] - packing["unpacked"]) / targets < 1e-5, packing

    # both exports: save_pretrained's files for the trained weights, reloading to the trained model's logits
    trained = load_file(str(out / "trained.safetensors"))
    oracle = save_pretrained_oracle(case, folder, trained, tmp_path / "save_pretrained")
    probe_ids = torch.tensor(json.loads((matrix / "spec.json").read_text())["probe"])
    trained_logits = load_file(str(out / "probe.safetensors"))["logits"]
    at_end = out / "run" / "hf"
    same_files(at_end, oracle)
    check_reload(case, at_end, probe_ids, trained_logits)
    if case in FROM_CHECKPOINT:  # the same tensors and config: what reloaded above reloads from here too
        exported = tmp_path / "export"
        res = CliRunner().invoke(main, ["export", str(out / "run"), "--out", str(exported), "--dtype", "fp32"])
        assert res.exit_code == 0, res.output
        same_files(exported, oracle)
        config = json.loads((at_end / "config.json").read_text())
        assert json.loads((exported / "config.json").read_text()) == config


def test_docs_table_is_this_matrix():
    """docs/families.md lists exactly the families run here, with packing refused exactly where it is asserted."""
    from tests.helpers import REPO

    rows = {}
    for line in (REPO / "docs" / "families.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 6 and cells[0] not in ("family", "---"):
            rows[cells[0]] = cells[1:5]
    assert list(rows) == list(FAMILIES)
    for name, (loads, trains, export, packing) in rows.items():
        assert (loads, trains, export) == ("yes", "yes", "yes"), name
        assert packing == ("refused" if name in NO_PACKING else "yes"), name
