"""Config loading: defaults, YAML, overrides, and the exact one-line errors for bad input."""

from __future__ import annotations

import pytest
import yaml

from fsdptrain.config.schema import DEMO_CONFIG, Config, dump_yaml, load_config, parse_size, reference_rows, to_dict
from fsdptrain.core.errors import ConfigError
from fsdptrain.core.files import FileError


def write(tmp_path, data, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(p)


def test_yaml_and_overrides_land_on_typed_fields(tmp_path):
    path = write(tmp_path, {"model": {"path": "/m"}, "train": {"lr": "1e-5", "max_steps": 10}})
    cfg = load_config(path, ["train.lr=2e-4", "parallel.activation_checkpointing=full", "train.adam_betas=[0.9, 0.99]"])
    assert cfg.model.path == "/m"
    assert cfg.train.lr == 2e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 10
    assert cfg.parallel.activation_checkpointing == "full"
    assert cfg.train.adam_betas == [0.9, 0.99]
    assert cfg.data.max_length == Config().data.max_length  # untouched keys keep defaults


def test_no_config_means_the_demo(tmp_path):
    cfg = load_config(None)
    assert cfg.model.hf_config["model_type"] == "llama"
    assert cfg.data.synthetic_task == "add"
    assert cfg.train.max_steps == 500


def test_configs_default_is_the_demo():
    from tests.helpers import REPO

    assert (REPO / "configs" / "default.yaml").read_text() == DEMO_CONFIG.read_text()


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    path = write(tmp_path, {"model": {"path": "/m"}, "train": {"lerning_rate": 1}})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: unknown key 'train.lerning_rate'")
    assert "keys in 'train': max_steps, epochs," in msg
    assert "\n" not in msg


def test_unknown_top_level_key_suggests_close_match(tmp_path):
    path = write(tmp_path, {"parralel": {}})
    with pytest.raises(ConfigError, match=r"unknown key 'parralel'; did you mean 'parallel'\?"):
        load_config(path)


def test_wrong_type_names_key_expected_and_got(tmp_path):
    path = write(tmp_path, {"model": {"path": "/m"}, "train": {"micro_batch_size": "four"}})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: train.micro_batch_size: expected an integer, got 'four' (str)"


def test_bool_is_not_an_integer(tmp_path):
    path = write(tmp_path, {"model": {"path": "/m"}, "train": {"max_steps": True}})
    with pytest.raises(ConfigError, match="train.max_steps: expected an integer, got True"):
        load_config(path)


def test_bad_choice_lists_allowed_values(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["parallel.precision=fp16"])
    assert str(e.value) == ("override 'parallel.precision=fp16': parallel.precision: 'fp16' is not allowed; "
                            "choose one of auto, bf16-mixed, fp32, bf16-pure")


def test_minimum_is_enforced():
    with pytest.raises(ConfigError, match=r"train.micro_batch_size: 0 is below the minimum 1"):
        load_config(None, ["train.micro_batch_size=0"])


def test_section_must_be_a_mapping(tmp_path):
    path = write(tmp_path, {"train": 3})
    with pytest.raises(ConfigError, match=r"'train' is a section; expected a mapping of keys, got 3"):
        load_config(path)


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "model:\n  path: [unclosed\n")
    with pytest.raises(FileError, match=r"c.yaml: not valid YAML \(line \d+, column \d+: "):
        load_config(path)


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(FileError, match=r"nope.yaml: no such file; check the path"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match=r"override 'train.lr': expected key.path=value"):
        load_config(None, ["train.lr"])


def test_cross_field_validation(tmp_path):
    path = write(tmp_path, {"train": {"lr": 1e-5}})
    with pytest.raises(ConfigError, match=r"set model.path .* or model.hf_config"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"train.adam_betas: expected two numbers in \[0, 1\)"):
        load_config(None, ["train.adam_betas=[0.9]"])
    # flash-attn has no fp32 kernels: refused before any work, not at the first forward
    with pytest.raises(ConfigError, match=r"demo.yaml: model.attn_implementation: flash_attention_2 runs in bf16/fp16 "
                                          r"only and parallel.precision is fp32; set parallel.precision=bf16-mixed "
                                          r"\(or auto\) or model.attn_implementation=sdpa$"):
        load_config(None, ["model.attn_implementation=flash_attention_2", "parallel.precision=fp32"])
    # auto is bf16-mixed on CUDA (flash attention is CUDA-only; on a CPU the run stops at loading flash-attn)
    load_config(None, ["model.attn_implementation=flash_attention_2", "parallel.precision=auto"])


def test_dump_round_trips_and_documents_every_key(tmp_path):
    cfg = load_config(None, ["train.lr=0.01", "parallel.reshard_after_forward=false"])
    text = dump_yaml(cfg)
    again = load_config(write(tmp_path, text, "dumped.yaml"))
    assert to_dict(again) == to_dict(cfg)
    n_keys = len(reference_rows())
    assert text.count("# ") >= n_keys
    assert all(doc for _, _, doc in reference_rows())


def test_configuration_doc_is_the_generated_reference():
    from tests.helpers import REPO, cli_inproc

    doc = (REPO / "docs" / "configuration.md").read_text()
    missing = [key for key, _, _ in reference_rows() if f"| `{key}` |" not in doc]
    assert not missing, (f"docs/configuration.md lacks {missing}; "
                         "regenerate it with `python -m fsdptrain config --reference`")
    generated = cli_inproc(["config", "--reference"])
    assert generated.returncode == 0, generated.stderr
    lines = doc.splitlines()
    start = lines.index("| key | default | meaning |")
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    section = "\n".join(lines[start:end]) + "\n"
    assert section == generated.stdout, ("docs/configuration.md differs from `fsdptrain config --reference`; "
                                         "regenerate its table with that command")


def test_mapping_override_merges_one_field():
    cfg = load_config(None, ["model.hf_config.num_hidden_layers=2"])
    assert cfg.model.hf_config["num_hidden_layers"] == 2
    assert cfg.model.hf_config["hidden_size"] == 128


def test_every_shipped_config_validates():
    from tests.helpers import REPO

    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        cfg = load_config(str(path))
        assert cfg.output_dir


def test_llamafactory_key_names_point_to_ours(tmp_path):
    path = write(tmp_path, {"cutoff_len": 1024})
    with pytest.raises(ConfigError, match=r"unknown key 'cutoff_len'; did you mean 'data.max_length'\?"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown key 'train.gradient_accumulation_steps'; "
                                          r"did you mean 'train.grad_accum_steps'\?"):
        load_config(None, ["train.gradient_accumulation_steps=4"])


def test_parse_size_units_and_errors():
    assert parse_size("80GiB", "k") == 80 * 2**30
    assert parse_size("80G", "k") == 80 * 2**30  # GPU sizes as quoted: binary
    assert parse_size("141GB", "k") == 141 * 10**9
    assert parse_size(" 1.5 TiB ", "k") == int(1.5 * 2**40)
    assert parse_size("500mb", "k") == 500 * 10**6
    assert parse_size("4096", "k") == 4096
    with pytest.raises(ConfigError) as e:
        parse_size("lots", "--gpu-memory")
    assert str(e.value) == "--gpu-memory: 'lots' is not a size; write e.g. 5GB, 500MB, 2GiB or 80G"
    with pytest.raises(ConfigError, match="not a size"):
        parse_size("5GB B", "k")
    with pytest.raises(ConfigError) as e:
        parse_size("0MB", "checkpoint.export_max_shard_size")
    assert str(e.value) == "checkpoint.export_max_shard_size: '0MB' must be above zero"
