"""LLaMA-Factory drop-in: its training YAMLs translate to exact fsdptrain keys, refusals are one line, its
template names mean the family's template (with its default system prompt), and an LF-style YAML trains.

The YAMLs in tests/lf_configs/ are written for these tests in the form of LLaMA-Factory's examples
(examples/train_full, examples/train_lora and the DeepSpeed JSONs of examples/deepspeed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fsdptrain.config.llamafactory import QWEN_SYSTEM, translate
from fsdptrain.config.schema import load_config
from fsdptrain.core.errors import UserError
from fsdptrain.core.files import read_yaml
from tests.helpers import LLAMA, cli_inproc, make_model_dir, read_metrics, run_cli

FIXTURES = Path(__file__).parent / "lf_configs"
SHARED = Path(__file__).resolve().parents[2] / "shared"
HF_ADAM = [0.9, 0.999]  # Hugging Face Trainer's AdamW betas, LLaMA-Factory's unless adam_beta1/2 say otherwise


def lf(name: str) -> dict:
    path = FIXTURES / name
    return translate(read_yaml(path), str(path)).config


def test_full_sft_example_translates_exactly():
    assert lf("full_sft.yaml") == {
        "model": {"path": "Qwen/Qwen3-4B-Instruct-2507", "trust_remote_code": True},
        "finetune": {"method": "full"},
        "parallel": {"reshard_after_forward": True, "precision": "bf16-mixed", "activation_checkpointing": "full"},
        "data": {"datasets": ["identity", "alpaca_en_demo"], "template": "qwen3_nothink", "max_length": 2048,
                 "max_samples": 1000, "overwrite_cache": True, "num_proc": 16, "num_workers": 4, "val_size": 0.1},
        "output_dir": "saves/qwen3-4b/full/sft",
        "logging": {"log_every": 10, "report_to": []},
        "checkpoint": {"save_every": 500, "resume": "none", "keep_last": 0},
        "train": {"micro_batch_size": 1, "grad_accum_steps": 2, "lr": 1e-5, "epochs": 3.0, "schedule": "cosine",
                  "warmup_ratio": 0.1, "eval_micro_batch_size": 1, "eval_every": 500, "adam_betas": HF_ADAM},
    }


def test_lora_example_translates_exactly_with_zero2_offload():
    assert lf("lora_sft.yaml") == {
        "model": {"path": "models/llama3-8b-instruct"},
        "finetune": {"method": "lora", "lora": {"rank": 16, "alpha": 32, "dropout": 0.05, "target": "q_proj,v_proj",
                                                "use_rslora": True, "modules_to_save": ["embed_tokens", "lm_head"]}},
        "parallel": {"reshard_after_forward": False, "optimizer_offload": True, "activation_checkpointing": "full"},
        "data": {"datasets": ["glaive_toolcall_en_demo"], "dataset_dir": "data", "template": "llama3",
                 "max_length": 1024, "packing": False, "train_on_prompt": False, "mask_history": True},
        "output_dir": "saves/llama3-8b/lora/sft",
        "logging": {"log_every": 5, "report_to": ["wandb"], "run_name": "llama3-lora"},
        "checkpoint": {"save_every": 100, "keep_last": 2},
        "train": {"micro_batch_size": 2, "grad_accum_steps": 4, "lr": 1e-4, "max_steps": 300, "schedule": "constant",
                  "warmup_steps": 20, "weight_decay": 0.01, "max_grad_norm": 0.5, "adam_betas": [0.9, 0.98]},
        "seed": 7,
    }


def test_dpo_example_translates_exactly():
    """stage dpo and its pref_* keys; simpo_gamma, which LLaMA-Factory reads only with pref_loss simpo, is left out
    (fsdptrain would refuse it as an option of another loss)."""
    assert lf("lora_dpo.yaml") == {
        "model": {"path": "Qwen/Qwen3-4B-Instruct-2507"},
        "finetune": {"method": "lora", "lora": {"rank": 8, "target": "all"}},
        "preference": {"beta": 0.2, "ftx": 0.1, "label_smoothing": 0.05, "loss": "sigmoid"},
        "parallel": {"activation_checkpointing": "full", "precision": "bf16-mixed"},
        "data": {"datasets": ["dpo_en_demo"], "max_length": 2048, "max_samples": 1000, "template": "qwen3_nothink"},
        "output_dir": "saves/qwen3-4b/lora/dpo",
        "logging": {"log_every": 10, "report_to": []},
        "checkpoint": {"keep_last": 0, "save_every": 500},
        "train": {"objective": "dpo", "micro_batch_size": 1, "grad_accum_steps": 8, "lr": 5e-06, "epochs": 3.0,
                  "schedule": "cosine", "warmup_ratio": 0.1, "adam_betas": HF_ADAM},
    }
    simpo = translate({"model_name_or_path": "m", "stage": "dpo", "pref_loss": "simpo", "simpo_gamma": 0.3,
                       "dpo_label_smoothing": 0.0}, "lf.yaml").config
    assert simpo["preference"] == {"loss": "simpo", "simpo_gamma": 0.3}
    sft = translate({"model_name_or_path": "m", "stage": "sft", "pref_beta": 0.3}, "lf.yaml").config
    assert "preference" not in sft and "objective" not in sft.get("train", {})  # LLaMA-Factory ignores it too
    # ref_model: a reference folder of its own, read by LLaMA-Factory only with a loss that has a reference
    ref = translate({"model_name_or_path": "m", "stage": "dpo", "ref_model": "models/ref"}, "lf.yaml").config
    assert ref["preference"] == {"ref_model": "models/ref"}
    for ignored in ({"stage": "dpo", "pref_loss": "orpo"}, {"stage": "rm"}, {"stage": "sft"}):
        out = translate({"model_name_or_path": "m", "ref_model": "models/ref", **ignored}, "lf.yaml").config
        assert "ref_model" not in out.get("preference", {})


def test_reward_example_translates_exactly():
    """stage rm: a reward model on the pairs; the pref_* keys, which LLaMA-Factory reads only under stage dpo, are
    left out (fsdptrain would refuse them with rm)."""
    assert lf("lora_reward.yaml") == {
        "model": {"path": "Qwen/Qwen3-4B-Instruct-2507", "trust_remote_code": True},
        "finetune": {"method": "lora", "lora": {"rank": 8, "target": "all"}},
        "parallel": {"activation_checkpointing": "full", "precision": "bf16-mixed"},
        "data": {"datasets": ["dpo_en_demo"], "max_length": 2048, "max_samples": 1000, "template": "qwen3_nothink"},
        "output_dir": "saves/qwen3-4b/lora/reward",
        "logging": {"log_every": 10, "report_to": []},
        "checkpoint": {"keep_last": 0, "save_every": 500},
        "train": {"objective": "rm", "micro_batch_size": 1, "grad_accum_steps": 8, "lr": 1e-4, "epochs": 3.0,
                  "schedule": "cosine", "warmup_ratio": 0.1, "adam_betas": HF_ADAM},
    }


def test_kto_example_translates_exactly():
    """stage kto: pref_beta, pref_ftx and the KTO weights translate; pref_loss, which LLaMA-Factory reads only under
    stage dpo, is left out (fsdptrain would refuse it with kto); the KTO weights are ignored under other stages."""
    assert lf("lora_kto.yaml") == {
        "model": {"path": "Qwen/Qwen3-4B-Instruct-2507", "trust_remote_code": True},
        "finetune": {"method": "lora", "lora": {"rank": 8, "target": "all"}},
        "preference": {"beta": 0.1, "ftx": 0.2, "kto_chosen_weight": 1.0, "kto_rejected_weight": 1.5},
        "parallel": {"activation_checkpointing": "full", "precision": "bf16-mixed"},
        "data": {"datasets": ["kto_en_demo"], "max_length": 2048, "max_samples": 1000, "template": "qwen3_nothink"},
        "output_dir": "saves/qwen3-4b/lora/kto",
        "logging": {"log_every": 10, "report_to": []},
        "checkpoint": {"keep_last": 0, "save_every": 500, "resume": "none"},
        "train": {"objective": "kto", "micro_batch_size": 1, "grad_accum_steps": 8, "lr": 5e-06, "epochs": 3.0,
                  "schedule": "cosine", "warmup_ratio": 0.1, "adam_betas": HF_ADAM},
    }
    dpo = translate({"model_name_or_path": "m", "stage": "dpo", "kto_rejected_weight": 2.0}, "lf.yaml").config
    assert "preference" not in dpo and dpo["train"]["objective"] == "dpo"


def test_freeze_and_pretrain_examples_take_llamafactory_defaults():
    hf_defaults = {"lr": 5e-5, "schedule": "linear", "epochs": 3.0, "micro_batch_size": 8, "adam_betas": HF_ADAM}
    assert lf("freeze_sft.yaml") == {
        "model": {"path": "models/qwen2.5-7b-instruct"},
        "finetune": {"method": "freeze", "freeze": {"trainable_layers": 4, "trainable_modules": "mlp,self_attn",
                                                    "extra_modules": ["embed_tokens"]}},
        "data": {"datasets": ["alpaca_en_demo"], "template": "qwen", "packing": True},
        "parallel": {"activation_checkpointing": "full"},
        "output_dir": "saves/qwen2.5-7b/freeze/sft",
        "train": hf_defaults, "logging": {"log_every": 500}, "checkpoint": {"save_every": 500, "keep_last": 0},
    }
    assert lf("lora_pretrain.yaml") == {  # stage pt packs unless packing: false
        "model": {"path": "models/qwen3-4b"},
        "data": {"packing": True, "datasets": ["c4_demo"], "max_length": 2048},
        "finetune": {"method": "lora", "lora": {"target": "all"}},
        "output_dir": "saves/qwen3-4b/lora/pretrain",
        "parallel": {"precision": "fp32", "activation_checkpointing": "none"},
        "train": hf_defaults, "logging": {"log_every": 500}, "checkpoint": {"save_every": 500, "keep_last": 0},
    }


def test_deepspeed_json_not_found_is_noted_and_pt_packing_can_be_off(tmp_path):
    t = translate({"model_name_or_path": "m", "stage": "pt", "packing": False, "deepspeed": "nope.json"},
                  str(tmp_path / "lf.yaml"))
    assert ("deepspeed", "nope.json not found; FSDP2 shards fully (ZeRO-3) unless parallel.* says otherwise") \
        in t.ignored
    assert t.config["data"] == {"packing": False} and "reshard_after_forward" not in t.config["parallel"]
    t = translate({"model_name_or_path": "m", "lr_scheduler_type": "constant", "warmup_ratio": 0.1}, "lf.yaml")
    assert "warmup_ratio" not in t.config["train"] and t.config["train"]["schedule"] == "constant"
    assert t.ignored == [("warmup_ratio", "lr_scheduler_type constant has no warmup (use constant_with_warmup)")]


def test_deepspeed_nvme_offload_of_the_optimizer_maps_to_optimizer_offload_nvme(tmp_path):
    ds = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/local_nvme"},
                                "offload_param": {"device": "nvme", "nvme_path": "/local_nvme"}}}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    t = translate({"model_name_or_path": "m", "deepspeed": "ds.json"}, str(tmp_path / "lf.yaml"))
    assert t.config["parallel"] == {"reshard_after_forward": True, "optimizer_offload": "nvme",
                                    "offload_dir": "/local_nvme", "activation_checkpointing": "full"}
    assert ("deepspeed", "offload_param to nvme: FSDP2 keeps the parameter shards in GPU memory; only the "
                         "optimizer state can go to NVMe (offload_optimizer device nvme)") in t.ignored


def test_keys_of_llamafactorys_other_back_ends_map_or_refuse_in_one_line():
    """Keys LLaMA-Factory's own examples use beyond DeepSpeed (HF Trainer fsdp, Megatron-Bridge, Ray, multimodal,
    feature settings): mapped, ignored with the reason, or refused naming the key (benchmarks/lf_examples.py
    runs every example)."""
    base = {"model_name_or_path": "m"}
    t = translate({**base, "fsdp": ["shard_grad_op", "auto_wrap"], "tensor_model_parallel_size": 1,
                   "recompute_granularity": "selective", "mixed_precision": "bf16_mixed",
                   "use_packed_sequences": True, "ray_num_workers": 4, "galore_rank": 16}, "lf.yaml")
    assert t.config["parallel"] == {"reshard_after_forward": False, "activation_checkpointing": "selective",
                                    "precision": "bf16-mixed"}
    assert t.config["data"] == {"packing": True}
    assert dict(t.ignored)["galore_rank"] == "only used with use_galore, which fsdptrain does not support"
    assert "ray_num_workers" in dict(t.ignored)
    for key in ("context_parallel_size", "sequence_parallel_size", "cp_size"):  # docs/long-context.md
        t = translate({**base, key: 4, "cp_mode": "ulysses"}, "lf.yaml")
        assert t.config["parallel"]["context_parallel"] == 4, key
    assert "context_parallel" not in translate({**base, "cp_size": 1}, "lf.yaml").config.get("parallel", {})
    assert translate({**base, "fsdp": "hybrid_shard offload"}, "lf.yaml").config["parallel"] == {
        "reshard_after_forward": True, "sharding": "hybrid", "cpu_offload": True, "activation_checkpointing": "full"}
    for extra, error in (
            ({"image_max_pixels": 262144}, "image_max_pixels: multimodal (image, video, audio) training is not "
                                           "supported; fsdptrain trains text-only causal LMs"),
            ({"cp_size": 2, "cp_mode": "ring"}, "cp_mode: 'ring' is not supported; fsdptrain's context "
                                                "parallelism is ulysses (set cp_mode: ulysses, it trains to the "
                                                "same result)"),
            ({"pipeline_model_parallel_size": 4}, "pipeline_model_parallel_size: 4 is not supported; fsdptrain "
                                                  "shards data-parallel with FSDP2 and has no pipeline parallelism: "
                                                  "set 1 or remove it"),
            ({"dataset_dir": "REMOTE:org/data"}, "dataset_dir: 'REMOTE:org/data' is a hub location; fsdptrain reads "
                                                 "local folders: download it and give the folder"),
            ({"fp8": True}, "fp8: FP8 training is not supported; fsdptrain trains in bf16 or fp32 (remove fp8)")):
        with pytest.raises(UserError) as e:
            translate({**base, **extra}, "lf.yaml")
        assert str(e.value) == f"lf.yaml: {error}"


def test_every_example_loads_and_validates_as_a_config():
    for name in ("full_sft.yaml", "lora_sft.yaml", "freeze_sft.yaml", "lora_pretrain.yaml"):
        cfg = load_config(str(FIXTURES / name), quiet=True)
        assert cfg.model.path is not None and cfg.finetune.method in ("full", "lora", "freeze")
    assert cfg.data.template == "auto" and cfg.train.adam_betas == HF_ADAM


def test_from_llamafactory_prints_a_loadable_fsdptrain_yaml(tmp_path):
    proc = cli_inproc(["config", "--from-llamafactory", str(FIXTURES / "lora_sft.yaml")])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"# {FIXTURES / 'lora_sft.yaml'}: LLaMA-Factory config translated")
    out = tmp_path / "fsdptrain.yaml"
    out.write_text(proc.stdout)
    assert yaml.safe_load(proc.stdout) == lf("lora_sft.yaml")
    assert load_config(str(out)).finetune.lora.rank == 16


REFUSALS = [  # (lines added to a minimal LF YAML, the one-line error after "FILE: ")
    ("stage: ppo", "stage: 'ppo' is not supported; fsdptrain trains sft (supervised), pt (pretraining), dpo "
                   "(preference pairs), kto (tagged responses) and rm (reward models) only"),
    ("stage: dpo\npref_loss: kto_pair", "pref_loss: 'kto_pair' is not supported; use sigmoid, ipo, hinge, orpo or "
                                        "simpo"),
    ("finetuning_type: oft", "finetuning_type: 'oft' is not supported; use full, lora or freeze"),
    ("fp16: true", "fp16: fsdptrain trains in bf16 or fp32, not fp16; set bf16: true (or remove fp16)"),
    ("quantization_bit: 4", "quantization_bit: quantized (QLoRA) training is not supported; remove it"),
    ("report_to: swanlab", "report_to: swanlab is not supported; use none or any of mlflow, tensorboard, wandb"),
    ("lr_scheduler_type: polynomial", "lr_scheduler_type: 'polynomial' is not supported; use one of cosine, "
                                      "linear, constant, constant_with_warmup"),
    ("eval_strategy: epoch", "eval_strategy: 'epoch' is not supported; use steps with eval_steps (or no)"),
    ("do_train: false", "do_train: fsdptrain train trains; remove do_train: false (fsdptrain eval evaluates a run)"),
    ("lerning_rate: 1.0e-4", "unknown LLaMA-Factory key 'lerning_rate'; did you mean 'learning_rate'? (the keys "
                             "fsdptrain reads, ignores or refuses are listed in docs/llamafactory.md)"),
    ("model: {path: m}", "'model' is a fsdptrain section, but model_name_or_path makes this a LLaMA-Factory YAML; "
                         "write one or the other (in a fsdptrain config: model.path)"),
    ("max_steps: ten", "max_steps: 'ten' is not a value LLaMA-Factory takes here; see docs/llamafactory.md"),
    ("template: yi", "data.template: 'yi' is not a template fsdptrain knows; use auto (the tokenizer's own chat "
                     "template) or one of LLaMA-Factory's names chatml, llama3, qwen, qwen3, qwen3_nothink, qwen3_5, "
                     "qwen3_5_nothink, llama2, llama4, mistral, ministral, mistral_small, gemma, gemma2, gemma3, "
                     "gemma4, phi, phi4, phi4_mini, deepseek3, deepseekr1, glm4, glm4_moe, granite3, granite4, "
                     "gpt_oss, default, empty (see docs/llamafactory.md)"),
]


@pytest.mark.parametrize("extra,error", REFUSALS, ids=[r[0].split(":")[0] for r in REFUSALS])
def test_refusals_are_one_line_naming_file_and_key(tmp_path, extra, error):
    path = tmp_path / "lf.yaml"
    path.write_text(f"model_name_or_path: {tmp_path}\ndataset: identity\n{extra}\n")
    proc = cli_inproc(["train", str(path)])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"fsdptrain: error: {path}: {error}"]


def test_lf_template_names_use_the_family_template_with_its_default_system():
    from fsdptrain.core.files import read_json
    from fsdptrain.data.tokenizer import apply_template, build_char_tokenizer


    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    # Qwen3's real chat template (rendering text needs no vocabulary: the built-in tokenizer carries it)
    qwen3 = build_char_tokenizer()
    qwen3.chat_template = read_json(SHARED / "tokenizers" / "qwen3" / "tokenizer_config.json")["chat_template"]
    own3 = qwen3.chat_template
    with_system = qwen3.apply_chat_template([{"role": "system", "content": QWEN_SYSTEM}] + chat, tokenize=False)
    # LLaMA-Factory's qwen default system is put first (Qwen3's template has none), and the empty <think> block
    # Qwen3's template writes before the last reply is left out, as LLaMA-Factory's qwen formats replies
    apply_template(qwen3, "qwen")
    think = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert with_system.count(think) == 1
    assert qwen3.apply_chat_template(chat, tokenize=False) == with_system.replace(think, "<|im_start|>assistant\n")
    qwen3.chat_template = own3
    apply_template(qwen3, "qwen3")  # no default system: the tokenizer's own template as it is
    assert qwen3.chat_template == own3
    with pytest.raises(UserError) as e:
        apply_template(qwen3, "gemma")
    assert str(e.value) == ("data.template=gemma: the tokenizer's chat template is not Gemma's (it has no "
                            "<start_of_turn>); set model.tokenizer to a Gemma tokenizer folder, or "
                            "data.template=auto to use this tokenizer's own template")


def test_lf_yaml_trains_two_steps_and_writes_the_translated_config(tmp_path):
    """`fsdptrain train lf.yaml` on LLaMA-Factory's identity data with a tiny model: LoRA, qwen template."""
    model = make_model_dir(tmp_path / "model", {**LLAMA, "num_hidden_layers": 2})
    run = tmp_path / "run"
    path = tmp_path / "lf.yaml"
    path.write_text(f"""model_name_or_path: {model}
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 4
lora_target: all
dataset: identity
dataset_dir: {SHARED / 'data' / 'llamafactory'}
template: qwen
cutoff_len: 256
max_samples: 40
overwrite_cache: true
output_dir: {run}
logging_steps: 1
save_steps: 2
plot_loss: true
report_to: none
per_device_train_batch_size: 2
gradient_accumulation_steps: 2
learning_rate: 1.0e-3
max_steps: 2
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: false
disable_gradient_checkpointing: true
""")
    proc = run_cli(["train", str(path)], FSDPTRAIN_CACHE=str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{path}: LLaMA-Factory config translated" in proc.stdout
    assert "finetuning_type->finetune.method=\"lora\"" in proc.stdout
    assert "ignored plot_loss: " in proc.stdout
    assert [m["step"] for m in read_metrics(run)] == [1, 2]
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["finetune"]["method"] == "lora" and written["finetune"]["lora"]["rank"] == 4
    assert written["data"]["template"] == "qwen" and written["data"]["max_samples"] == 40
    assert written["train"]["lr"] == 1e-3 and written["train"]["adam_betas"] == HF_ADAM
    assert written["train"]["grad_accum_steps"] == 2 and written["parallel"]["precision"] == "fp32"
