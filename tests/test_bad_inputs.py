"""Bad input, one test per class: each ends with one line `fsdptrain: error: <file/key>: ...`, exit status 2, no
traceback and nothing lost; anything else ends with two lines, a traceback file and exit status 1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fsdptrain import cli
from fsdptrain.core.files import FileError
from tests.helpers import LLAMA, cli_inproc, make_model_dir, run_cli

TINY_RUN = ["train.max_steps=2", "data.synthetic_examples=64", "logging.progress=none"]


def one_line_error(proc, *parts: str) -> str:
    """The exit status is 2 and stderr is exactly one `fsdptrain: error:` line holding every part."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fsdptrain: error: "), lines[0]
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- config files and values


def test_config_not_utf8(tmp_path):
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes("output_dir: runs/caf\u00e9\n".encode("latin-1"))
    one_line_error(cli_inproc(["config", str(cfg)]), f"{cfg}: not UTF-8 text (byte 0xe9", "save it as UTF-8")


def test_duplicate_yaml_key(tmp_path):
    cfg = tmp_path / "dup.yaml"
    cfg.write_text("model:\n  hf_config: {model_type: llama}\ntrain:\n  lr: 1.0e-4\n  lr: 1.0e-3\n")
    one_line_error(cli_inproc(["config", str(cfg)]), f"{cfg}: line 5: key 'lr' appears twice", "keep one")


def test_invalid_yaml_names_file_and_line(tmp_path):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("train:\n  lr: [1e-4\n")
    one_line_error(cli_inproc(["config", str(cfg)]), f"{cfg}: not valid YAML (line 3, column 1")


@pytest.mark.parametrize("override, key", [("train.lr=.nan", "train.lr"), ("train.lr=nan", "train.lr"),
                                           ("parallel.timeout_minutes=.inf", "parallel.timeout_minutes"),
                                           ("train.max_grad_norm=-.inf", "train.max_grad_norm")])
def test_float_options_must_be_finite(override, key):
    one_line_error(cli_inproc(["config", override]), f"{key}: ", "is not a finite number; give a finite number")


def test_zero_epochs_without_max_steps_is_refused(tmp_path):
    out = tmp_path / "run"
    proc = cli_inproc(["train", "train.max_steps=null", "train.epochs=0", f"output_dir={out}"])
    one_line_error(proc, "train.epochs: 0.0 trains nothing", "set train.epochs above 0", "train.max_steps")
    assert not out.exists()
    assert cli_inproc(["config", "train.max_steps=3", "train.epochs=0"]).returncode == 0  # max_steps decides


def test_folder_as_config(tmp_path):
    one_line_error(cli_inproc(["train", str(tmp_path)]),
                   f"{tmp_path}: is a folder, not a file; give a YAML config file")


def test_missing_config_file(tmp_path):
    one_line_error(cli_inproc(["config", str(tmp_path / "nope.yaml")]), f"{tmp_path / 'nope.yaml'}: no such file")


@pytest.mark.parametrize("command", ["train", "config", "estimate"])
@pytest.mark.parametrize("flag", [["--config", "my.yaml"], ["--config=my.yaml"]])
def test_config_flag_gets_a_hint(command, flag):
    line = one_line_error(cli_inproc([command, *flag, "train.lr=1e-4"]))
    assert line == (f"fsdptrain: error: --config: give the config file as the first argument: "
                    f"fsdptrain {command} FILE [key=value ...]")


def test_empty_output_dir(tmp_path):
    one_line_error(cli_inproc(["train", "output_dir="], cwd=tmp_path), "output_dir: the folder name is empty",
                   "give a folder")
    assert not any(tmp_path.iterdir())


def test_output_dir_is_a_file(tmp_path):
    taken = tmp_path / "notes.txt"
    taken.write_text("keep me\n")
    one_line_error(cli_inproc(["train", f"output_dir={taken}"]), f"output_dir: {taken} is a file; give a folder")
    one_line_error(cli_inproc(["config", f"output_dir={taken / 'run'}"]), f"is inside {taken}, which is a file")
    assert taken.read_text() == "keep me\n"


# ----------------------------------------------------------------------------- model folders


def test_truncated_safetensors_in_model_folder(tmp_path):
    model = make_model_dir(tmp_path / "m", LLAMA)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    proc = cli_inproc(["train", f"model.path={model}", "model.hf_config=null", *TINY_RUN,
                       f"output_dir={tmp_path / 'r'}"])
    one_line_error(proc, f"{weights}: truncated", "download or save it again")


@pytest.mark.parametrize("content, problem", [
    (b"\x00" * 3, "too short for a safetensors header"),
    (bytes(range(256)) * 8, "reaches past the end of the file"),
    (len(b"[1, 2]").to_bytes(8, "little") + b"[1, 2]", "its header is not a mapping of tensors"),
    (len(b'{"w": {"dtype": "F32"}}').to_bytes(8, "little") + b'{"w": {"dtype": "F32"}}',
     "the header entry of tensor 'w' is malformed"),
], ids=["short", "random", "list-header", "entry-without-shape"])
def test_damaged_safetensors_is_one_line_naming_the_file(tmp_path, content, problem):
    from fsdptrain.model.models import safetensors_index

    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(FileError) as e:
        safetensors_index(str(tmp_path))
    assert str(e.value).startswith(f"{tmp_path / 'model.safetensors'}: not a valid safetensors file")
    assert problem in str(e.value) and str(e.value).endswith("download or save it again")


def test_damaged_model_config_and_index(tmp_path):
    from fsdptrain.model.models import load_hf_config, safetensors_index

    (tmp_path / "config.json").write_text('{"model_type": "llama",\n')
    with pytest.raises(FileError, match=r"config.json: not valid JSON \(line 2"):
        load_hf_config(str(tmp_path), None, None, False)
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(FileError, match=r"config.json: cannot read as a Hugging Face model config \(ValueError: "
                                        r".*\); check that model.path is a Hugging Face model folder"):
        load_hf_config(str(tmp_path), None, None, False)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ["a"]}')
    with pytest.raises(FileError, match=r"index.json: key 'weight_map': expected a mapping"):
        safetensors_index(str(tmp_path))


def test_quantized_model_folder_is_refused_in_one_line(tmp_path):
    """A GPTQ / fp8 / mxfp4 folder's weights are not what fsdptrain trains: refused before anything is read."""
    model = make_model_dir(tmp_path / "m", LLAMA)
    cfg = json.loads((model / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (model / "config.json").write_text(json.dumps(cfg))
    proc = cli_inproc(["train", f"model.path={model}", "model.hf_config=null", *TINY_RUN,
                       f"output_dir={tmp_path / 'r'}"])
    one_line_error(proc, f"model.path: {model / 'config.json'}: quantization_config (gptq): the weights are "
                         "quantized, and fsdptrain loads and trains full-precision (bf16/fp32) weights",
                   "point model.path at the unquantized model (QLoRA is not supported)")
    assert not any((tmp_path / "r").iterdir())  # nothing written


def test_an_unknown_model_type_is_one_line_with_the_closest_known_types(tmp_path):
    """Not transformers' warning first, nor its three sentences: the file, the type, the nearest known ones."""
    import transformers

    model = make_model_dir(tmp_path / "m", LLAMA)
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "llamaa"
    (model / "config.json").write_text(json.dumps(cfg))
    line = (f"fsdptrain: error: {model / 'config.json'}: unknown model_type 'llamaa' (closest known: 'llama', "
            f"'mllama', 'llama4'; transformers {transformers.__version__} knows "
            f"{len(transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES)}); fix model_type in that file, "
            "or upgrade transformers if the model is newer than it")
    proc = run_cli(["train", f"model.path={model}", *TINY_RUN, f"output_dir={tmp_path / 'r'}"], timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", line + "\n")  # a process: transformers' own
    # warnings would show on its stderr
    data = cli_inproc(["data", f"model.path={model}"])  # its tokenizer is the model folder's: the same line
    assert (data.returncode, data.stdout, data.stderr) == (2, "", line + "\n")
    inline = cli_inproc(["train", "model.hf_config={model_type: qwen2.5}", *TINY_RUN, f"output_dir={tmp_path / 'i'}"])
    assert (inline.returncode, inline.stdout) == (2, "")
    assert inline.stderr == ("fsdptrain: error: model.hf_config: unknown model_type 'qwen2.5' (closest known: "
                             f"'qwen2', 'qwen3_5', 'qwen2_5_vl'; transformers {transformers.__version__} knows "
                             f"{len(transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES)}); fix "
                             "model.hf_config.model_type\n")


def test_context_length_above_max_position_embeddings_warns():
    from transformers import AutoConfig, PretrainedConfig

    from fsdptrain.model.models import check_context_length

    hf = AutoConfig.for_model("llama", max_position_embeddings=256)
    msg = check_context_length(hf, 1024)
    assert msg is not None and "data.max_length 1024" in msg and "max_position_embeddings 256" in msg
    assert check_context_length(hf, 256) is None
    assert "max_position_embeddings 1024" in check_context_length(AutoConfig.for_model("gpt2"), 2048)  # n_positions
    assert check_context_length(PretrainedConfig(), 10**6) is None  # no such field: nothing to say


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    proc = run_cli(["train", *TINY_RUN, f"output_dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _damage(run: Path, name: str, change) -> Path:
    """Rewrite one checkpoint file and record its new size in COMPLETE.json, as a hand edit that kept the sizes."""
    ckpt = next((run / "checkpoints").glob("step-*"))
    path = ckpt / name
    text = path.read_text()
    new = change(text)
    path.write_text(new)
    if name != "COMPLETE.json":
        marker = json.loads((ckpt / "COMPLETE.json").read_text())
        marker["files"][name] = path.stat().st_size
        (ckpt / "COMPLETE.json").write_text(json.dumps(marker))
    return path


def _edit(**changes):
    def change(text):
        state = json.loads(text)
        for k, v in changes.items():
            if v is None:
                state.pop(k)
            else:
                state[k] = v
        return json.dumps(state)
    return change


@pytest.mark.parametrize("name, change, expected", [
    ("COMPLETE.json", lambda t: t[: len(t) // 2], "COMPLETE.json: not valid JSON (line 1"),
    ("train_state.json", lambda t: t.replace("{", "[", 1), "train_state.json: not valid JSON (line 1"),
    ("train_state.json", _edit(step="abc"), "train_state.json: key 'step': expected an integer, got \"abc\""),
    ("train_state.json", _edit(scheduler=None), "train_state.json: key 'scheduler' is missing"),
    ("train_state.json", lambda t: _edit(scheduler={**json.loads(t)["scheduler"], "base_lrs": "x"})(t),
     "train_state.json: key 'scheduler.base_lrs': expected a list of 2 value(s) like"),
    ("rng/rank-00000.json", _edit(torch=None), "rank-00000.json: cannot read as a checkpoint's random states "
                                               "(KeyError: 'torch')"),
], ids=["marker-json", "state-json", "step-type", "no-scheduler", "scheduler-value", "rng-key"])
def test_damaged_checkpoint_json_is_one_line(finished_run, tmp_path, name, change, expected):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    damaged = _damage(run, name, change)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*") if "config.yaml" not in p.name)
    proc = cli_inproc(["train", *TINY_RUN, "train.max_steps=3", f"output_dir={run}"])
    one_line_error(proc, expected, "resume from another checkpoint")
    assert damaged.exists()
    after = sorted(str(p.relative_to(run)) for p in run.rglob("*") if "config.yaml" not in p.name)
    assert before == after  # nothing moved, nothing deleted


# ----------------------------------------------------------------------------- the last resort


@pytest.fixture()
def crashing_trainer(monkeypatch, tmp_path):
    """`fsdptrain train` whose trainer raises the exception the test hands in."""
    import tempfile

    import fsdptrain.trainer

    monkeypatch.setattr(cli, "crash_dir", None)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()

    def invoke(exc: BaseException, out: Path):
        def boom(cfg, examples=None):
            raise exc
        monkeypatch.setattr(fsdptrain.trainer, "train", boom)
        monkeypatch.delenv("RANK", raising=False)
        return CliRunner().invoke(cli.main, ["train", f"output_dir={out}"])
    return invoke


def _crash_lines(result) -> tuple[str, Path]:
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 2, result.stderr
    prefix = "fsdptrain: the full traceback is in "
    assert lines[1].startswith(prefix), lines[1]
    return lines[0], Path(lines[1][len(prefix):].split("; ")[0])


def test_internal_error_writes_the_traceback_to_a_file(crashing_trainer, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    result = crashing_trainer(RuntimeError("something broke\nsecond line"), out)
    first, path = _crash_lines(result)
    assert first == "fsdptrain: internal error: RuntimeError: something broke"
    assert result.stderr.splitlines()[1].endswith("please report it with the command you ran")
    assert path.parent == out and path.name.startswith("crash-rank0-") and path.suffix == ".txt"
    text = path.read_text()
    assert "Traceback (most recent call last)" in text and "second line" in text and "torch " in text


def test_internal_error_before_the_output_dir_exists_goes_to_a_temp_file(crashing_trainer, tmp_path):
    result = crashing_trainer(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), tmp_path / "new")
    first, path = _crash_lines(result)
    assert first == "fsdptrain: out of memory: OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB"
    assert path.parent == tmp_path / "tmp" and path.name.startswith("fsdptrain-crash-")
    assert "OutOfMemoryError" in path.read_text()
    assert not (tmp_path / "new").exists()


def test_user_errors_keep_exit_status_2_in_process(crashing_trainer, tmp_path):
    from fsdptrain.core.errors import TrainingError

    result = crashing_trainer(TrainingError("non-finite loss at step 3; lower train.lr"), tmp_path / "r")
    assert result.exit_code == 2
    assert result.stderr == "fsdptrain: error: non-finite loss at step 3; lower train.lr\n"
    assert not list((tmp_path / "tmp").iterdir())
