"""Evaluation's one-line mistakes, and the W&B (offline) and MLflow (local file store) sinks, tested for real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fsdptrain.config.schema import load_config
from fsdptrain.core.errors import ConfigError, UserError
from fsdptrain.data import pipeline
from fsdptrain.data.tokenizer import build_char_tokenizer
from tests.helpers import read_metrics

MODEL = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


def jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def load(tmp_path: Path, **data):
    given = [f"data.{k}={json.dumps(v)}" for k, v in data.items()]
    cfg = load_config(None, ["model.hf_config={model_type: llama}", f"data.cache_dir={tmp_path / 'cache'}",
                             "data.val_size=0", "data.max_length=64", *given])
    lines: list[str] = []
    train, evals = pipeline.load_train_eval(cfg, build_char_tokenizer(), log=lines.append)
    return train, evals, lines


def test_val_split_is_seeded_disjoint_and_complete(tmp_path):
    train, evals, lines = load(tmp_path, synthetic_examples=50, val_size=0.1)
    assert len(evals) == 5 and len(train) == 45  # ceil(0.1 x 50)
    assert not set(train.indices) & set(evals.indices) and sorted(train.indices + evals.indices) == list(range(50))
    assert "data: val_size 0.1: 5 examples held out for evaluation, 45 to train" in lines
    again = load(tmp_path, synthetic_examples=50, val_size=5)[1]
    assert again.indices == evals.indices  # a count and the same fraction, same seed: the same examples


def test_bad_eval_inputs(tmp_path):
    with pytest.raises(ConfigError) as e:
        load(tmp_path, synthetic_examples=20, val_size=20)
    assert str(e.value) == ("data.val_size: 20 takes 20 of the 20 examples, leaving none to train on; lower "
                            "data.val_size or add data")
    with pytest.raises(ConfigError) as e:
        load(tmp_path, synthetic_examples=20, val_size=2.5)
    assert str(e.value) == ("data.val_size: 2.5 is neither a fraction in (0, 1) nor a whole number of examples; "
                            "write e.g. 0.05 or 200")
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": {"hf_config": MODEL}, "train": {"eval_every": 5}}))
    with pytest.raises(ConfigError) as e:
        load_config(str(cfg_file))
    assert str(e.value) == (f"{cfg_file}: train.eval_every: 5 needs eval data; set data.val_size (e.g. 0.05) or "
                            "data.eval_datasets")
    with pytest.raises(ConfigError) as e:
        load_config(str(cfg_file), ["train.eval_every=0", "checkpoint.keep_best=true"])
    assert "checkpoint.keep_best needs eval data" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(str(cfg_file), ["data.val_size=0.1", "data.eval_datasets=[x.jsonl]"])
    assert str(e.value).endswith("data.val_size and data.eval_datasets exclude each other; set one (val_size "
                                 "splits data.datasets, eval_datasets are separate data)")
    train_file = jsonl(tmp_path / "train.jsonl",
                       [{"instruction": f"add {i} and {i}", "output": str(2 * i)} for i in range(12)])
    empty = jsonl(tmp_path / "empty.jsonl", [{"instruction": "", "output": ""}, {"instruction": " ", "output": ""}])
    with pytest.raises(UserError) as e:
        load(tmp_path, datasets=[train_file], eval_datasets=[empty])
    assert str(e.value) == (f"data.eval_datasets: data set '{empty}': all 2 records were skipped (2 empty); check "
                            "its formatting (alpaca) and tags in dataset_info.json")


def test_eval_data_overlapping_training_is_counted(tmp_path):
    records = [{"instruction": f"add {i} and {i}", "output": str(2 * i)} for i in range(12)]
    train_file = jsonl(tmp_path / "train.jsonl", records)
    eval_file = jsonl(tmp_path / "eval.jsonl", records[:3] + [{"instruction": "new", "output": "one"}])
    train, evals, lines = load(tmp_path, datasets=[train_file], eval_datasets=[eval_file])
    assert len(train) == 12 and len(evals) == 4
    assert ("eval data: warning: 3 of the 4 eval examples are also training examples; the eval loss of those "
            "measures memorisation (check data.eval_datasets against data.datasets)") in lines


def test_missing_sink_package_is_one_line(monkeypatch):
    import importlib.util

    from fsdptrain.run import sinks

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError) as e:
        sinks.active(["tensorboard", "mlflow"], True)
    assert str(e.value) == ("logging.report_to: mlflow is listed but the mlflow package is not installed; pip "
                            "install mlflow-skinny  (or pip install 'fsdptrain[mlflow]'), or remove mlflow from "
                            "logging.report_to")
    assert sinks.active(["tensorboard", "wandb"], False) == ["wandb"]  # the deprecated tensorboard: false


def wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline W&B run file (LevelDB-style log records of wandb's protobuf Record)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # full / first, then middle and last parts
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_wandb_offline_and_mlflow_file_store_get_train_and_eval_scalars(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="a test extra: pip install 'fsdptrain[test]'")
    pytest.importorskip("mlflow", reason="a test extra: pip install 'fsdptrain[test]'")
    from mlflow.tracking import MlflowClient

    from fsdptrain.trainer import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store for those who opt in
    out, store = tmp_path / "run", f"file:{tmp_path / 'mlruns'}"
    cfg = load_config(None, [f"output_dir={out}", "model.hf_config=" + json.dumps(MODEL),
                             "data.synthetic_examples=40", "data.max_length=64", "data.val_size=4",
                             "train.max_steps=2", "train.micro_batch_size=4", "train.eval_every=1",
                             "parallel.device=cpu", "logging.progress=none", "checkpoint.save_at_end=false",
                             "logging.report_to=[tensorboard,wandb,mlflow]", f"logging.mlflow_tracking_uri={store}",
                             "logging.run_name=sinks"])
    train(cfg)
    metrics = read_metrics(out)
    want = {(m["step"], "loss"): m["loss"] for m in metrics if "loss" in m}
    want.update({(m["step"], "eval/loss"): m["eval_loss"] for m in metrics if "eval_loss" in m})
    assert len(want) == 4

    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    got = {(r["_step"], k): v for r in wandb_history(run_file) for k, v in r.items() if k in ("loss", "eval/loss")}
    assert got == want

    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("fsdptrain").experiment_id])
    assert run.info.run_name == "sinks" and run.data.params["data.val_size"] == "4.0"
    got = {(m.step, key): m.value for key in ("loss", "eval/loss")
           for m in client.get_metric_history(run.info.run_id, key)}
    assert got == want
