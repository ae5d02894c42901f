"""Evaluation: exact eval loss on 1, 2 and 3 ranks against a plain transformers computation, side-effect-free
training, in-run vs `fsdptrain eval`, keep_best and `export --best`, and the one-line mistakes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from fsdptrain.data.encode import IGNORE
from tests.helpers import LLAMA, read_metrics, torchrun
from tests.workers import eval_cases

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "attention_dropout": 0.2}  # dropout: an evaluation that consumed random numbers would change training
VAL = 13  # eval examples: divisible by neither ranks x micro-batch (2, 4, 6) nor the chunked case's 3 x ranks
EVAL_CASES = {
    "plain": {},
    "packed": {"data": {"packing": True, "pack_length": 72}, "train": {"eval_micro_batch_size": 1}},
    "chunked_ckpt": {"train": {"loss_chunk_tokens": 16, "eval_micro_batch_size": 3},
                     "parallel": {"activation_checkpointing": "full"}},
    "capped": {"train": {"eval_max_batches": 2, "eval_micro_batch_size": 3}},  # the first 6 examples only
}


def write(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def eval_config(root: Path, model_dir: Path, extra: dict) -> dict:
    cfg = {"output_dir": str(root / "unused"), "seed": 3, "model": {"path": str(model_dir)},
           "data": {"synthetic_examples": 60, "max_length": 64, "val_size": VAL},
           "train": {"micro_batch_size": 2}, "parallel": {"device": "cpu", "precision": "fp32"}}
    for section, values in extra.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def train_config(out: Path, **train) -> dict:
    return {"output_dir": str(out), "seed": 5, "model": {"hf_config": TINY},
            "data": {"synthetic_examples": 64, "max_length": 64, "val_size": 10},
            "train": {"max_steps": 4, "micro_batch_size": 2, "lr": 3e-3, **train},
            "checkpoint": {"save_every": 2, "keep_last": 1, "keep_best": True},
            "parallel": {"device": "cpu", "precision": "fp32"},
            "logging": {"log_every": 1, "tensorboard": False, "progress": "none"}}


def plain_model_dir(path: Path) -> Path:
    """transformers' own random init (loss near ln(vocab), so 1e-6 is a tight bound), saved as safetensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fsdptrain.data.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    fields = {**LLAMA, "num_hidden_layers": 2}
    cfg = AutoConfig.for_model(fields.pop("model_type"), vocab_size=len(tok), **fields)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model_dir = plain_model_dir(root / "model")
    evals = [{"name": n, "config": write(root / f"{n}.yaml", eval_config(root, model_dir, extra))}
             for n, extra in EVAL_CASES.items()]
    return root, model_dir, evals


@pytest.fixture(scope="module")
def oracle(setup):
    """Per-example summed cross-entropy from transformers itself, one example at a time, no padding."""
    from transformers import AutoModelForCausalLM

    from fsdptrain.config.schema import load_config
    from fsdptrain.data import pipeline
    from fsdptrain.data.tokenizer import load_tokenizer

    root, model_dir, evals = setup
    cfg = load_config(evals[0]["config"])
    _, examples = pipeline.load_train_eval(cfg, load_tokenizer(None, str(model_dir)), log=lambda m: None)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    sums, counts = [], []
    with torch.no_grad():
        for i in range(len(examples)):
            e = examples[i]
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            target = torch.tensor(e.labels[1:] + [IGNORE])
            sums.append(F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum").double().item())
            counts.append(int((target != IGNORE).sum()))
    return sums, counts


def expected(oracle, n: int) -> tuple[float, int]:
    sums, counts = oracle
    return math.fsum(sums[:n]) / sum(counts[:n]), sum(counts[:n])


def check_exact(out: dict, oracle, world: int) -> None:
    assert out["world_size"] == world
    res = out["eval"]
    assert len(oracle[0]) == VAL
    for name, r in res.items():
        n = 6 if name == "capped" else VAL
        loss, tokens = expected(oracle, n)
        assert r["tokens"] == tokens, (name, r)
        assert abs(r["loss"] - loss) < 1e-6, (name, world, r["loss"], loss)
        assert r["rng_same"] and r["mode_back"], (name, r)
    # the packed rows must not divide evenly either (else padding rows were never exercised)
    assert res["packed"]["rows"] % world != 0 or world == 1, res["packed"]


def test_eval_exact_one_rank(setup, oracle, tmp_path):
    _, _, evals = setup
    evals = [c for c in evals if c["name"] in ("plain", "packed")]  # the other settings run on 2 ranks
    out = eval_cases.run({"out": str(tmp_path / "r.json"), "eval": evals})
    torch.distributed.destroy_process_group()
    check_exact(out, oracle, 1)


@pytest.fixture(scope="module")
def two_ranks(setup):
    """One 2-rank launch: the eval cases, and two training runs (eval every step / only at the end)."""
    root, _, evals = setup
    runs = {"every": root / "run-every", "end": root / "run-end"}
    spec = {"out": str(root / "two.json"), "eval": evals,
            "train": [write(root / "every.yaml", train_config(runs["every"], eval_every=1)),
                      write(root / "end.yaml", train_config(runs["end"]))]}
    (root / "two-spec.json").write_text(json.dumps(spec))
    p = torchrun(2, ["-m", "tests.workers.eval_cases", str(root / "two-spec.json")])
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((root / "two.json").read_text()), runs


def test_eval_exact_two_ranks(two_ranks, oracle):
    check_exact(two_ranks[0], oracle, 2)


@pytest.mark.slow
def test_eval_exact_three_ranks(setup, oracle):
    root, _, evals = setup
    evals = [c for c in evals if c["name"] in ("plain", "packed")]  # the other settings run on 2 ranks
    (root / "three-spec.json").write_text(json.dumps({"out": str(root / "three.json"), "eval": evals}))
    p = torchrun(3, ["-m", "tests.workers.eval_cases", str(root / "three-spec.json")])
    assert p.returncode == 0, p.stderr[-3000:]
    check_exact(json.loads((root / "three.json").read_text()), oracle, 3)


def test_training_with_eval_every_step_is_bitwise_unchanged(two_ranks):
    runs = two_ranks[1]
    every, end = read_metrics(runs["every"]), read_metrics(runs["end"])
    losses = [[m["loss"] for m in ms if "loss" in m] for ms in (every, end)]
    norms = [[m["grad_norm"] for m in ms if "loss" in m] for ms in (every, end)]
    assert len(losses[0]) == 4 and losses[0] == losses[1] and norms[0] == norms[1]
    evals = [(m["step"], m["eval_loss"]) for m in every if "eval_loss" in m]
    assert [s for s, _ in evals] == [1, 2, 3, 4]
    assert [m["step"] for m in end if "eval_loss" in m] == [4]  # the final evaluation only
    assert [m["eval_loss"] for m in end if "eval_loss" in m] == [evals[-1][1]]
    for m in every:
        if "eval_loss" in m:
            assert m["eval_ppl"] == pytest.approx(math.exp(m["eval_loss"]), rel=1e-12) and m["eval_tokens"] > 0


def test_keep_best_eval_command_and_export_best(two_ranks, tmp_path):
    from click.testing import CliRunner

    from fsdptrain.cli import main
    from fsdptrain.config.schema import load_config
    from fsdptrain.evalrun import eval_checkpoint

    run = two_ranks[1]["every"]
    evals = {m["step"]: m["eval_loss"] for m in read_metrics(run) if "eval_loss" in m}
    best_step = min((2, 4), key=evals.__getitem__)  # the saved steps
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best["step"] == best_step and best["eval_loss"] == evals[best_step]
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert kept == sorted({f"step-{best_step:08d}", "step-00000004"})  # keep_last 1, plus the best

    cfg = load_config(str(run / "config.yaml"))
    # the run directory -> its newest checkpoint, on 1 rank: the in-run value of 2 ranks
    res = eval_checkpoint(cfg, str(run), str(tmp_path / "newest.json"))
    assert abs(res.loss - evals[4]) < 1e-6
    written = json.loads((tmp_path / "newest.json").read_text())
    assert written["step"] == 4 and written["eval_loss"] == res.loss and written["eval_tokens"] == res.tokens

    # the command without CONFIG: a checkpoint in the run brings the run's config.yaml, a first key=value overrides it
    ckpt = run / "checkpoints" / "step-00000004"
    r = CliRunner().invoke(main, ["eval", "--checkpoint", str(ckpt), "--out", str(tmp_path / "cli.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "cli.json").read_text())["eval_loss"] == res.loss
    r = CliRunner().invoke(main, ["eval", "train.eval_max_batches=1", "train.eval_micro_batch_size=3", "--checkpoint",
                                  str(ckpt), "--out", str(tmp_path / "one.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "one.json").read_text())["examples"] == 3

    r = CliRunner().invoke(main, ["export", str(run), "--best", "--out", str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output
    assert f"step-{best_step:08d}" in r.output
    res = eval_checkpoint(cfg, str(tmp_path / "hf"), str(tmp_path / "hf.json"))  # a Hugging Face folder
    assert abs(res.loss - evals[best_step]) < 1e-6

    from fsdptrain.core.errors import UserError

    with pytest.raises(UserError) as e:
        eval_checkpoint(cfg, str(tmp_path / "nope"), None)
    assert str(e.value) == (f"--checkpoint: {tmp_path / 'nope'}: no such folder; give a checkpoint folder, a run "
                            "directory or a Hugging Face model folder")
    (tmp_path / "notes.json").write_text("{}")
    with pytest.raises(UserError) as e:
        eval_checkpoint(cfg, str(run), str(tmp_path / "notes.json"))
    assert str(e.value) == (f"--out: {tmp_path / 'notes.json'} exists and is not an fsdptrain eval result; give "
                            "another file")


def test_plot_overlays_runs(two_ranks, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="a test extra: pip install 'fsdptrain[test]'")
    from PIL import Image, ImageStat

    from fsdptrain.core.errors import UserError
    from fsdptrain.run.plot import plot

    runs = two_ranks[1]
    out = plot([str(runs["every"]), str(runs["end"])], str(tmp_path / "p.png"))
    with Image.open(out) as im:
        assert im.size == (1600, 900)
        stat = ImageStat.Stat(im.convert("L"))
        assert stat.stddev[0] > 10 and len(im.convert("RGB").getcolors(1 << 20)) > 50  # curves, not a blank page
    assert plot([str(runs["every"])], str(out)) == out  # its own earlier file may be replaced
    foreign = tmp_path / "mine.png"
    foreign.write_bytes(b"not ours")
    with pytest.raises(UserError, match="exists and was not written by fsdptrain plot"):
        plot([str(runs["every"])], str(foreign))
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(UserError) as e:
        plot([str(runs["every"])], str(tmp_path / "q.png"))
    assert str(e.value) == ("plot: matplotlib is not installed; pip install 'fsdptrain[plot]' (or pip install "
                            "matplotlib)")


@pytest.mark.parametrize("method", ["lora", "freeze"])
def test_lora_and_freeze_checkpoints_evaluate(tmp_path, method):
    """A LoRA / freeze checkpoint holds the trainable weights only: `fsdptrain eval` loads the frozen ones from the
    config's model.path (it failed in DCP with a missing key before) and gives the run's own eval loss."""
    from fsdptrain import trainer
    from fsdptrain.config.schema import load_config
    from fsdptrain.evalrun import eval_checkpoint

    model = plain_model_dir(tmp_path / "model")
    cfg = train_config(tmp_path / "run", max_steps=2, eval_every=2)
    cfg["model"] = {"path": str(model)}
    cfg["finetune"] = {"method": method, **({"lora": {"rank": 4, "alpha": 8, "target": "all"}} if method == "lora"
                                            else {"freeze": {"trainable_layers": 1}})}
    path = write(tmp_path / "cfg.yaml", cfg)
    trainer.train(load_config(path))
    trained = [m["eval_loss"] for m in read_metrics(tmp_path / "run") if "eval_loss" in m]
    res = eval_checkpoint(load_config(path), str(tmp_path / "run"), str(tmp_path / "e.json"))
    assert abs(res.loss - trained[-1]) < 1e-6 and res.ppl == pytest.approx(math.exp(res.loss))
