"""LLaMA-Factory compatibility: what its training YAML keys and chat template names mean in fsdptrain.

`fsdptrain train lf_sft.yaml` accepts a LLaMA-Factory training YAML as it is: a file whose top level holds
`model_name_or_path` (LLaMA-Factory requires it; fsdptrain's own configs have `model:` instead) is translated by
`translate` into fsdptrain's nested config keys before the usual strict loading. Every LLaMA-Factory key is in
`KEYS`: translated to fsdptrain keys, ignored with the reason printed, or refused in one line naming the key and
what to do; a key that is in none of these is refused like an unknown fsdptrain key. Where a key is absent,
LLaMA-Factory's (Hugging Face Trainer's) default is translated where it differs from fsdptrain's (`DEFAULTS`), so
the run trains as the same YAML did under LLaMA-Factory.

`LF_TEMPLATES` says what each supported LLaMA-Factory template name (`data.template: qwen`) means: the chat
template of that family (the tokenizer's own, which must be of the family) plus LLaMA-Factory's default system
prompt where its template has one; data/tokenizer.py applies it. docs/llamafactory.md is the user's guide.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..core import log
from ..core.errors import ConfigError
from ..core.files import read_json, read_yaml

# ----------------------------------------------------------------------------- template names


@dataclass(frozen=True)
class LFTemplate:
    """A LLaMA-Factory template name: `builtin` names fsdptrain's own template to use; otherwise the tokenizer's
    own chat template is used and must contain `marker` (the family's turn token); `system` is put first when a
    conversation has no system message (LLaMA-Factory's default_system)."""

    family: str
    marker: str = ""
    system: str = ""
    builtin: str = ""
    no_empty_think: bool = False  # leave out the empty <think> block the family's template writes before a reply
    system_with_tools: bool = False  # a system turn (empty if need be) whenever the record has a tool list


QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
LF_TEMPLATES = {
    "chatml": LFTemplate("ChatML", builtin="chatml"),
    "llama3": LFTemplate("Llama 3", builtin="llama3"),
    "qwen": LFTemplate("Qwen", "<|im_start|>", QWEN_SYSTEM, no_empty_think=True),
    "qwen3": LFTemplate("Qwen3", "<|im_start|>"),
    "qwen3_nothink": LFTemplate("Qwen3", "<|im_start|>", no_empty_think=True, system_with_tools=True),
    "qwen3_5": LFTemplate("Qwen3.5", "<|im_start|>"),
    "qwen3_5_nothink": LFTemplate("Qwen3.5", "<|im_start|>"),
    "llama2": LFTemplate("Llama 2", "[INST]"),
    "llama4": LFTemplate("Llama 4", "<|header_start|>"),
    "mistral": LFTemplate("Mistral", "[INST]"),
    "ministral": LFTemplate("Mistral", "[INST]"),
    "mistral_small": LFTemplate("Mistral Small", "[INST]"),
    "gemma": LFTemplate("Gemma", "<start_of_turn>"),
    "gemma2": LFTemplate("Gemma 2", "<start_of_turn>"),
    "gemma3": LFTemplate("Gemma 3", "<start_of_turn>"),
    "gemma4": LFTemplate("Gemma 4", "<|turn>", "You are a helpful assistant."),
    "phi": LFTemplate("Phi-3", "<|assistant|>"),
    "phi4": LFTemplate("Phi-4", "<|im_sep|>"),
    "phi4_mini": LFTemplate("Phi-4-mini", "<|assistant|>"),
    "deepseek3": LFTemplate("DeepSeek-V3", "<｜Assistant｜>"),
    "deepseekr1": LFTemplate("DeepSeek-R1", "<｜Assistant｜>"),
    "glm4": LFTemplate("GLM-4", "[gMASK]"),
    "glm4_moe": LFTemplate("GLM-4.5", "[gMASK]"),
    "granite3": LFTemplate("Granite 3", "<|start_of_role|>"),
    "granite4": LFTemplate("Granite 4", "<|start_of_role|>",
                           "You are Granite, developed by IBM. You are a helpful AI assistant."),
    "gpt_oss": LFTemplate("gpt-oss", "<|channel|>"),  # its own template already writes the default system
    "default": LFTemplate("LLaMA-Factory's default", builtin="default"),
    "empty": LFTemplate("LLaMA-Factory's empty", builtin="empty"),
}
TEMPLATE_NAMES = ("auto", *LF_TEMPLATES)


def template_problem(name: str) -> Optional[str]:
    """data.template's check: auto or a supported LLaMA-Factory name."""
    if name in TEMPLATE_NAMES:
        return None
    close = difflib.get_close_matches(name, TEMPLATE_NAMES, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return (f"{name!r} is not a template fsdptrain knows; {hint}use auto (the tokenizer's own chat template) or one "
            f"of LLaMA-Factory's names {', '.join(LF_TEMPLATES)} (see docs/llamafactory.md)")


# ----------------------------------------------------------------------------- training YAML


def is_llamafactory(raw: Any) -> bool:
    """A LLaMA-Factory training YAML: LLaMA-Factory requires model_name_or_path; fsdptrain's configs use model:."""
    return isinstance(raw, dict) and "model_name_or_path" in raw


@dataclass
class Translation:
    """fsdptrain's nested keys, what each LLaMA-Factory key became, and what was ignored and why."""

    config: dict
    mapped: list[tuple[str, str]]  # (LLaMA-Factory key, "fsdptrain.key=value, ...")
    ignored: list[tuple[str, str]]  # (LLaMA-Factory key, why)


Out = dict[str, Any]  # dotted fsdptrain key -> value


class Refused(Exception):
    """A key's value fsdptrain cannot honour; the message says what to do (the caller names file and key)."""


def _to(dotted: str, convert: Callable[[Any], Any] = lambda v: v) -> Callable[[Any, dict], Out]:
    return lambda v, ctx: {dotted: convert(v)}


def _names(value: Any) -> list:
    """LLaMA-Factory's comma-separated names (or a list) as a list."""
    if isinstance(value, list):
        return [str(x).strip() for x in value if str(x).strip()]
    return [x.strip() for x in str(value).split(",") if x.strip()]


def _stage(v: Any, ctx: dict) -> Out:
    if v == "sft":
        return {}
    if v == "pt":  # LLaMA-Factory packs pretraining data unless packing: false
        return {} if "packing" in ctx else {"data.packing": True}
    if v in ("dpo", "rm", "kto"):  # rm: a reward model on the same pairs; kto: tagged single responses
        return {"train.objective": v}
    raise Refused(f"{v!r} is not supported; fsdptrain trains sft (supervised), pt (pretraining), dpo "
                  "(preference pairs), kto (tagged responses) and rm (reward models) only")


def _pref(dotted: str) -> Callable[[Any, dict], Out]:
    """pref_beta, pref_ftx: translated under stage dpo and kto (LLaMA-Factory's KTO trainer reads both); for other
    stages LLaMA-Factory ignores them, and so do we."""
    return lambda v, ctx: {dotted: v} if ctx.get("stage") in ("dpo", "kto") else {}


def _kto_weight(dotted: str) -> Callable[[Any, dict], Out]:
    """kto_chosen_weight, kto_rejected_weight: read under stage kto only (ignored otherwise, as LLaMA-Factory does)."""
    return lambda v, ctx: {dotted: v} if ctx.get("stage") == "kto" else {}


def _pref_loss(v: Any, ctx: dict) -> Out:
    if ctx.get("stage") != "dpo":
        return {}
    if v not in ("sigmoid", "ipo", "hinge", "orpo", "simpo"):
        raise Refused(f"{v!r} is not supported; use sigmoid, ipo, hinge, orpo or simpo")
    return {"preference.loss": v}


def _label_smoothing(v: Any, ctx: dict) -> Out:
    """dpo_label_smoothing: LLaMA-Factory's default 0 is left out (it is no option of another loss)."""
    return {"preference.label_smoothing": v} if ctx.get("stage") == "dpo" and v else {}


def _simpo_gamma(v: Any, ctx: dict) -> Out:
    """simpo_gamma: only a simpo run reads it (LLaMA-Factory ignores it otherwise, with a default of 0.5)."""
    return {"preference.simpo_gamma": v} if ctx.get("stage") == "dpo" and ctx.get("pref_loss") == "simpo" else {}


def _ref_model(v: Any, ctx: dict) -> Out:
    """ref_model: a reference folder of its own, read by LLaMA-Factory only under stage dpo with a loss that has a
    reference (not orpo or simpo); ignored otherwise, as there."""
    if not v or ctx.get("stage") != "dpo" or ctx.get("pref_loss") in ("orpo", "simpo"):
        return {}
    return {"preference.ref_model": v}


def _method(v: Any, ctx: dict) -> Out:
    if v in ("full", "lora", "freeze"):
        return {"finetune.method": v}
    raise Refused(f"{v!r} is not supported; use full, lora or freeze")


def _precision(v: Any, ctx: dict) -> Out:
    if ctx.get("pure_bf16"):
        return {"parallel.precision": "bf16-pure"}
    return {"parallel.precision": "bf16-mixed" if v else "fp32"}


def _pure_bf16(v: Any, ctx: dict) -> Out:
    return {"parallel.precision": "bf16-pure"} if v else {}


def _fp16(v: Any, ctx: dict) -> Out:
    if v:
        raise Refused("fsdptrain trains in bf16 or fp32, not fp16; set bf16: true (or remove fp16)")
    return {}


def _checkpointing(v: Any, ctx: dict) -> Out:
    """LLaMA-Factory checkpoints activations unless disable_gradient_checkpointing (gradient_checkpointing: true
    forces it on)."""
    on = bool(ctx.get("gradient_checkpointing")) or not ctx.get("disable_gradient_checkpointing", False)
    return {"parallel.activation_checkpointing": "full" if on else "none"}


def _do_train(v: Any, ctx: dict) -> Out:
    if v is False:
        raise Refused("fsdptrain train trains; remove do_train: false (fsdptrain eval evaluates a run)")
    return {}


def _neat_packing(v: Any, ctx: dict) -> Out:
    return {"data.packing": True} if v else {}  # fsdptrain's packing never lets examples attend to each other


SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant"}


def _schedule(v: Any, ctx: dict) -> Out:
    if v not in SCHEDULES:
        raise Refused(f"{v!r} is not supported; use one of {', '.join(SCHEDULES)}")
    return {"train.schedule": SCHEDULES[v]}


def _warmup(dotted: str) -> Callable[[Any, dict], Out]:
    def one(v: Any, ctx: dict) -> Out:
        if ctx.get("lr_scheduler_type") == "constant" and v:  # Hugging Face's constant schedule has no warmup
            ctx["__notes__"].append((dotted.split(".")[-1], "lr_scheduler_type constant has no warmup (use "
                                                             "constant_with_warmup)"))
            return {}
        return {dotted: v}
    return one


def _max_steps(v: Any, ctx: dict) -> Out:
    return {} if v is None or v <= 0 else {"train.max_steps": v}  # -1: Hugging Face's "use epochs"


def _keep(v: Any, ctx: dict) -> Out:
    return {"checkpoint.keep_last": 0 if v is None else v}  # Hugging Face keeps every checkpoint by default


def _resume(v: Any, ctx: dict) -> Out:
    if v is None or v is True:  # LLaMA-Factory continues from the last checkpoint in output_dir
        return {"checkpoint.resume": "none" if ctx.get("overwrite_output_dir") else "auto"}
    if v is False:
        return {"checkpoint.resume": "none"}
    return {"checkpoint.resume": str(v)}


def _overwrite(v: Any, ctx: dict) -> Out:
    return {} if "resume_from_checkpoint" in ctx else {"checkpoint.resume": "none" if v else "auto"}


SINKS = {"tensorboard", "wandb", "mlflow"}


def _report(v: Any, ctx: dict) -> Out:
    names = _names(v) if v is not None else []
    if names in (["none"], []):
        return {"logging.report_to": []}
    bad = [n for n in names if n not in SINKS]
    if bad:
        raise Refused(f"{', '.join(bad)} is not supported; use none or any of {', '.join(sorted(SINKS))}")
    return {"logging.report_to": names}


def _eval_strategy(v: Any, ctx: dict) -> Out:
    if v in ("no", None):
        return {}
    if v == "steps":
        return {"train.eval_every": ctx.get("eval_steps") or ctx.get("logging_steps", 500)}
    raise Refused(f"{v!r} is not supported; use steps with eval_steps (or no)")


def _eval_steps(v: Any, ctx: dict) -> Out:
    return {} if "eval_strategy" in ctx else {"train.eval_every": v}


def _save_strategy(v: Any, ctx: dict) -> Out:
    if v == "steps":
        return {}
    if v == "no":
        return {"checkpoint.save_every": 0, "checkpoint.save_at_end": False}
    raise Refused(f"{v!r} is not supported; use steps with save_steps (or no)")


def _attention(v: Any, ctx: dict) -> Out:
    kinds = {"auto": "sdpa", "sdpa": "sdpa", "fa2": "flash_attention_2", "disabled": "eager"}
    if v not in kinds:
        raise Refused(f"{v!r} is not supported; use auto, sdpa, fa2 or disabled")
    return {"model.attn_implementation": kinds[v]}


def _optim(v: Any, ctx: dict) -> Out:
    if v in ("adamw_torch", "adamw_torch_fused", "adamw_hf"):
        return {}
    raise Refused(f"{v!r} is not supported; fsdptrain uses AdamW (adamw_torch)")


def _betas(v: Any, ctx: dict) -> Out:
    return {"train.adam_betas": [ctx.get("adam_beta1", 0.9), ctx.get("adam_beta2", 0.999)]}


def _deepspeed(v: Any, ctx: dict) -> Out:
    """DeepSpeed's ZeRO settings as FSDP2 ones, when the JSON can be read (LLaMA-Factory resolves the path
    against the working folder; the YAML's own folder is tried too)."""
    if not v:
        return {}
    found = [p for p in (Path(v), Path(ctx["__dir__"]) / v) if p.is_file()]
    if not found:
        ctx["__notes__"].append(("deepspeed", f"{v} not found; FSDP2 shards fully (ZeRO-3) unless "
                                              "parallel.* says otherwise"))
        return {}
    ds = read_json(found[0], "a DeepSpeed config")
    zero = ds.get("zero_optimization") or {} if isinstance(ds, dict) else {}
    # ZeRO-3 frees gathered weights after forward; ZeRO-2 and below keep them until backward
    out: Out = {"parallel.reshard_after_forward": zero.get("stage", 0) >= 3}
    param_off, opt_off = zero.get("offload_param") or {}, zero.get("offload_optimizer") or {}
    if param_off.get("device") == "cpu":
        out["parallel.cpu_offload"] = True  # FSDP2 CPU offload holds the optimizer state on the CPU too
    elif opt_off.get("device") == "cpu":
        out["parallel.optimizer_offload"] = True
    elif opt_off.get("device") == "nvme" and opt_off.get("nvme_path"):  # ZeRO-Infinity: the state in files
        out.update({"parallel.optimizer_offload": "nvme", "parallel.offload_dir": str(opt_off["nvme_path"])})
    if param_off.get("device") == "nvme":
        ctx["__notes__"].append(("deepspeed", "offload_param to nvme: FSDP2 keeps the parameter shards in GPU "
                                              "memory; only the optimizer state can go to NVMe "
                                              "(offload_optimizer device nvme)"))
    tp = (ds.get("tensor_parallel") or {}).get("autotp_size", 1) if isinstance(ds, dict) else 1
    if tp not in (None, 1):
        ctx["__notes__"].append(("deepspeed", f"tensor_parallel.autotp_size {tp}: FSDP2 has no tensor parallelism; "
                                              "every rank holds a shard of each weight instead"))
    return out


def _mix(v: Any, ctx: dict) -> Out:
    if v in ("concat", None):
        return {}  # fsdptrain concatenates the data sets (and shuffles the examples)
    raise Refused(f"{v!r} is not supported; data sets are concatenated (concat); weight them with num_samples in "
                  "data.datasets")


def _dataset_dir(v: Any, ctx: dict) -> Out:
    if isinstance(v, str) and v.startswith("REMOTE:"):  # LLaMA-Factory fetches dataset_info.json from a hub
        raise Refused(f"{v!r} is a hub location; fsdptrain reads local folders: download it and give the folder")
    return {"data.dataset_dir": v}


def _fsdp(v: Any, ctx: dict) -> Out:
    """Hugging Face Trainer's fsdp options as FSDP2 settings (FSDP2 always wraps each transformer block)."""
    options = set(_names(v.replace(" ", ",")) if isinstance(v, str) else _names(v or []))
    known = {"full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "offload", "auto_wrap"}
    if options - known:
        raise Refused(f"{', '.join(sorted(options - known))} is not supported; use any of {', '.join(sorted(known))}")
    out: Out = {}
    if options & {"full_shard", "hybrid_shard"}:
        out["parallel.reshard_after_forward"] = True
    if options & {"shard_grad_op", "hybrid_shard_zero2"}:
        out["parallel.reshard_after_forward"] = False
    if options & {"hybrid_shard", "hybrid_shard_zero2"}:
        out["parallel.sharding"] = "hybrid"
    if "offload" in options:
        out["parallel.cpu_offload"] = True
    return out


def _model_parallel(kind: str) -> Callable[[Any, dict], Out]:
    """Megatron's model-parallel sizes: 1 is plain data parallelism, which FSDP2 gives; more is refused."""
    def one(v: Any, ctx: dict) -> Out:
        if v in (None, 1):
            return {}
        raise Refused(f"{v} is not supported; fsdptrain shards data-parallel with FSDP2 and has no {kind} "
                      "parallelism: set 1 or remove it")
    return one


def _context_parallel(v: Any, ctx: dict) -> Out:
    """A sequence split over ranks (Megatron's and v0's context/sequence parallel size, v1's cp_size): fsdptrain's
    Ulysses context parallelism, which trains like the unsplit run whatever the split method."""
    if v in (None, 1):
        return {}
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise Refused(f"{v!r} is not a number of ranks; give a positive integer")
    return {"parallel.context_parallel": v}


def _cp_mode(v: Any, ctx: dict) -> Out:
    if v in (None, "ulysses"):
        return {}
    raise Refused(f"{v!r} is not supported; fsdptrain's context parallelism is ulysses (set cp_mode: ulysses, "
                  "it trains to the same result)")


def _recompute(v: Any, ctx: dict) -> Out:
    if v in ("full", "selective"):
        return {"parallel.activation_checkpointing": v}
    raise Refused(f"{v!r} is not supported; use full or selective")


def _mixed_precision(v: Any, ctx: dict) -> Out:
    if v == "bf16_mixed":
        return {"parallel.precision": "bf16-mixed"}
    raise Refused(f"{v!r} is not supported; use bf16_mixed (fsdptrain trains in bf16 or fp32)")


def _ignore(why: str) -> tuple[str, str]:
    return ("ignore", why)


def _refuse_if_set(what: str) -> tuple[str, str]:
    return ("refuse_if_set", what)


OFFLOAD = "FSDP2 replaces DeepSpeed"
MULTIMODAL = _refuse_if_set("multimodal (image, video, audio) training is not supported; fsdptrain trains text-only "
                            "causal LMs")
# LLaMA-Factory key -> a translation (value, the whole YAML -> {fsdptrain dotted key: value}; Refused says what to
# do) or ("ignore", why) or ("refuse_if_set", what to do: refused unless false/null/0)
KEYS: dict[str, Any] = {
    # model
    "model_name_or_path": _to("model.path"),
    "trust_remote_code": _to("model.trust_remote_code"),
    "flash_attn": _attention,
    "cache_dir": _ignore("fsdptrain loads local model folders only"),
    "use_fast_tokenizer": _ignore("the model folder's tokenizer is loaded as transformers chooses"),
    "low_cpu_mem_usage": _ignore("fsdptrain always loads weights shard by shard"),
    "disable_gradient_checkpointing": _checkpointing,
    "use_reentrant_gc": _ignore("fsdptrain's activation checkpointing is non-reentrant"),
    "upcast_layernorm": _ignore("norms compute in fp32 under bf16-mixed"),
    "moe_aux_loss_coef": _to("train.router_aux_loss_coef"),
    "adapter_name_or_path": _refuse_if_set("fsdptrain starts LoRA from the base model; resume a fsdptrain run with "
                                    "checkpoint.resume, or merge the adapter into the model folder first"),
    "quantization_bit": _refuse_if_set("quantized (QLoRA) training is not supported; remove it"),
    "quantization_method": _ignore("no quantized training"),
    "rope_scaling": _refuse_if_set("set rope_scaling in the model folder's config.json instead"),
    "use_unsloth": _refuse_if_set("not supported; remove it"),
    "enable_liger_kernel": _refuse_if_set("not supported; set train.loss_chunk_tokens for a memory-light loss"),
    "train_from_scratch": _to("model.random_init"),
    "add_tokens": _refuse_if_set("not supported; add the tokens to the tokenizer and model folder first"),
    "add_special_tokens": _refuse_if_set("not supported; add the tokens to the tokenizer and model folder first"),
    "new_special_tokens_config": _refuse_if_set("not supported; add the tokens to the tokenizer and model "
                                                "folder first"),
    "resize_vocab": _refuse_if_set("not supported; resize the model folder's embeddings first"),
    # method
    "stage": _stage,
    "do_train": _do_train,
    "do_eval": _ignore("evaluation runs when eval data is set (val_size, eval_dataset)"),
    "do_predict": _refuse_if_set("prediction is not supported; remove it"),
    "finetuning_type": _method,
    "pref_beta": _pref("preference.beta"),
    "pref_ftx": _pref("preference.ftx"),
    "kto_chosen_weight": _kto_weight("preference.kto_chosen_weight"),
    "kto_rejected_weight": _kto_weight("preference.kto_rejected_weight"),
    "pref_loss": _pref_loss,
    "dpo_label_smoothing": _label_smoothing,
    "simpo_gamma": _simpo_gamma,
    "pref_bco_weight": _refuse_if_set("BCO's extra term is not supported; remove it (0)"),
    "ld_alpha": _refuse_if_set("LD-DPO is not supported; remove it"),
    "ref_model": _ref_model,
    "ref_model_adapters": _refuse_if_set("not supported; remove it"),
    "ref_model_quantization_bit": _refuse_if_set("quantized reference models are not supported; remove it"),
    "lora_rank": _to("finetune.lora.rank"),
    "lora_alpha": _to("finetune.lora.alpha"),
    "lora_dropout": _to("finetune.lora.dropout"),
    "lora_target": _to("finetune.lora.target", lambda v: v if isinstance(v, list) else str(v)),
    "use_rslora": _to("finetune.lora.use_rslora"),
    "additional_target": _to("finetune.lora.modules_to_save", _names),
    "freeze_trainable_layers": _to("finetune.freeze.trainable_layers"),
    "freeze_trainable_modules": _to("finetune.freeze.trainable_modules",
                                    lambda v: v if isinstance(v, list) else str(v)),
    "freeze_extra_modules": _to("finetune.freeze.extra_modules", _names),
    "use_dora": _refuse_if_set("DoRA is not supported; remove it (plain LoRA)"),
    "pissa_init": _refuse_if_set("PiSSA is not supported; remove it"),
    "loraplus_lr_ratio": _refuse_if_set("LoRA+ is not supported; remove it"),
    "create_new_adapter": _refuse_if_set("not supported; remove it"),
    "use_llama_pro": _refuse_if_set("LLaMA Pro is not supported; remove it"),
    "use_galore": _refuse_if_set("GaLore is not supported; remove it"),
    "use_apollo": _refuse_if_set("APOLLO is not supported; remove it"),
    "use_badam": _refuse_if_set("BAdam is not supported; remove it"),
    "use_adam_mini": _refuse_if_set("Adam-mini is not supported; remove it"),
    "use_muon": _refuse_if_set("Muon is not supported; remove it"),
    "use_dft_loss": _refuse_if_set("not supported; remove it"),
    "use_asft_loss": _refuse_if_set("not supported; remove it"),
    "use_eaft_loss": _refuse_if_set("not supported; remove it"),
    "deepspeed": _deepspeed,
    "plot_loss": _ignore("metrics.jsonl holds the loss of every logged step; fsdptrain plot RUN draws it"),
    "compute_accuracy": _refuse_if_set("not supported; remove it"),
    "disable_shuffling": _to("data.shuffle", lambda v: not v),
    "include_effective_tokens_per_second": _ignore("fsdptrain logs tokens per second"),
    # dataset
    "template": _to("data.template", lambda v: "auto" if v is None else v),
    "dataset": _to("data.datasets", _names),
    "eval_dataset": _to("data.eval_datasets", _names),
    "dataset_dir": _dataset_dir,
    "cutoff_len": _to("data.max_length"),
    "max_samples": _to("data.max_samples"),
    "overwrite_cache": _to("data.overwrite_cache"),
    "preprocessing_num_workers": _to("data.num_proc", lambda v: v or 1),
    "preprocessing_batch_size": _ignore("fsdptrain tokenises record by record"),
    "dataloader_num_workers": _to("data.num_workers"),
    "packing": _to("data.packing"),
    "neat_packing": _neat_packing,
    "train_on_prompt": _to("data.train_on_prompt"),
    "mask_history": _to("data.mask_history"),
    "val_size": _to("data.val_size"),
    "streaming": _refuse_if_set("streaming data sets are not supported; remove it"),
    "mix_strategy": _mix,
    "interleave_probs": _refuse_if_set("interleaving is not supported; use num_samples per data set in "
                                       "data.datasets"),
    "tokenized_path": _ignore("fsdptrain caches tokenised data itself (data.cache_dir)"),
    "tool_format": _refuse_if_set("tools are rendered by the chat template; remove it"),
    "default_system": _refuse_if_set("put a system column in the data set, or use a template with a default "
                                     "system prompt"),
    "enable_thinking": _ignore("reasoning is trained as the data holds it (docs/templates.md)"),
    "ignore_pad_token_for_loss": _ignore("padding never carries a label"),
    # output
    "output_dir": _to("output_dir"),
    "overwrite_output_dir": _overwrite,
    "logging_steps": _to("logging.log_every"),
    "save_steps": _to("checkpoint.save_every"),
    "save_strategy": _save_strategy,
    "save_total_limit": _keep,
    "save_only_model": _ignore("checkpoints hold the optimizer state so a run can resume"),
    "report_to": _report,
    "run_name": _to("logging.run_name"),
    "load_best_model_at_end": _to("checkpoint.keep_best"),
    "metric_for_best_model": _ignore("the best checkpoint is the one of lowest eval loss"),
    # train
    "per_device_train_batch_size": _to("train.micro_batch_size"),
    "gradient_accumulation_steps": _to("train.grad_accum_steps"),
    "learning_rate": _to("train.lr"),
    "num_train_epochs": _to("train.epochs", float),
    "max_steps": _max_steps,
    "lr_scheduler_type": _schedule,
    "warmup_ratio": _warmup("train.warmup_ratio"),
    "warmup_steps": _warmup("train.warmup_steps"),
    "weight_decay": _to("train.weight_decay"),
    "max_grad_norm": _to("train.max_grad_norm"),
    "adam_beta1": _betas,
    "adam_beta2": _betas,
    "adam_epsilon": _to("train.adam_eps"),
    "optim": _optim,
    "bf16": _precision,
    "pure_bf16": _pure_bf16,
    "fp16": _fp16,
    "gradient_checkpointing": _checkpointing,
    "seed": _to("seed"),
    "resume_from_checkpoint": _resume,
    "ddp_timeout": _ignore("parallel.timeout_minutes (default 30) ends a hung collective instead"),
    "dataloader_pin_memory": _ignore("batches are built by fsdptrain's loader"),
    "torch_compile": _to("parallel.compile"),
    # eval
    "eval_strategy": _eval_strategy,
    "evaluation_strategy": _eval_strategy,
    "eval_steps": _eval_steps,
    "per_device_eval_batch_size": _to("train.eval_micro_batch_size"),
    "eval_on_each_dataset": _refuse_if_set("not supported; remove it"),
    # multimodal models
    **dict.fromkeys(("image_max_pixels", "image_min_pixels", "image_do_pan_and_scan", "crop_to_patches",
                     "video_max_pixels", "video_min_pixels", "video_fps", "video_maxlen", "use_audio_in_video",
                     "audio_sampling_rate"), MULTIMODAL),
    **dict.fromkeys(("freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model"),
                    _ignore("multimodal models only; fsdptrain trains text-only causal LMs")),
    # launchers, kernels and distributed back ends LLaMA-Factory can use instead of DeepSpeed
    "fsdp": _fsdp,
    "fsdp_transformer_layer_cls_to_wrap": _ignore("FSDP2 shards each transformer block (fsdptrain finds them)"),
    "gradient_checkpointing_kwargs": _ignore("fsdptrain's activation checkpointing is non-reentrant"),
    "use_v1_kernels": _ignore("fsdptrain uses PyTorch's and transformers' kernels"),
    **dict.fromkeys(("ray_num_workers", "ray_init_kwargs", "ray_run_name", "ray_storage_path",
                     "resources_per_worker", "placement_strategy"),
                    _ignore("fsdptrain runs under torchrun (fsdptrain launch), not Ray: the launcher's process "
                            "count applies")),
    "fp8": _refuse_if_set("FP8 training is not supported; fsdptrain trains in bf16 or fp32 (remove fp8)"),
    "mixture_of_depths": _refuse_if_set("Mixture-of-Depths is not supported; remove it"),
    "predict_with_generate": _refuse_if_set("prediction is not supported; remove it"),
    "use_kt": _refuse_if_set("KTransformers is not supported; remove it"),
    "double_quantization": _ignore("only used with quantization_bit, which fsdptrain refuses"),
    # Megatron (LLaMA-Factory's Megatron-Bridge back end)
    "tensor_model_parallel_size": _model_parallel("tensor"),
    "pipeline_model_parallel_size": _model_parallel("pipeline"),
    "context_parallel_size": _context_parallel,
    "sequence_parallel_size": _context_parallel,
    "cp_size": _context_parallel,
    "cp_mode": _cp_mode,
    "expert_model_parallel_size": _model_parallel("expert"),
    "sequence_parallel": _refuse_if_set("Megatron sequence parallelism is not supported (it needs tensor "
                                        "parallelism); remove it"),
    "use_distributed_optimizer": _ignore("FSDP2 shards the optimizer state over the ranks anyway"),
    **dict.fromkeys(("overlap_param_gather", "overlap_grad_reduce"),
                    _ignore("FSDP2 overlaps its all-gathers and reduce-scatters with compute itself")),
    **dict.fromkeys(("bias_activation_fusion", "apply_rope_fusion", "moe_grouped_gemm",
                     "moe_token_dispatcher_type"), _ignore("Megatron kernel choices; fsdptrain runs transformers' "
                                                           "modelling code")),
    "recompute_granularity": _recompute,
    "mixed_precision": _mixed_precision,
    "use_packed_sequences": _to("data.packing"),
    "export_hf_on_finish": _to("checkpoint.export_hf"),
}

# Settings of a feature fsdptrain refuses when it is switched on (by the key named): ignored on their own, so a
# YAML that leaves the feature off still loads, in whatever order its keys come.
FAMILIES = {"apollo_": "use_apollo", "galore_": "use_galore", "badam_": "use_badam", "oft_": "finetuning_type oft",
            "pissa_": "pissa_init", "asft_": "use_asft_loss", "kt_": "use_kt", "fp8_": "fp8",
            "ppo_": "stage ppo"}


def _family(key: str) -> Optional[tuple[str, str]]:
    for prefix, parent in FAMILIES.items():
        if str(key).startswith(prefix):
            return _ignore(f"only used with {parent}, which fsdptrain does not support")
    return None

# Hugging Face Trainer / LLaMA-Factory defaults that differ from fsdptrain's, applied where the YAML omits the key,
# so the run trains as it did under LLaMA-Factory.
DEFAULTS = {"learning_rate": 5e-5, "lr_scheduler_type": "linear", "num_train_epochs": 3.0,
            "per_device_train_batch_size": 8, "adam_beta1": 0.9, "logging_steps": 500, "save_steps": 500,
            "save_total_limit": None, "disable_gradient_checkpointing": False}


# fsdptrain's sections
SECTIONS = ("model", "data", "train", "parallel", "checkpoint", "finetune", "preference", "logging", "memory")


def translate(raw: dict, source: str) -> Translation:
    """A LLaMA-Factory training YAML (its parsed mapping) as fsdptrain's nested config keys; ConfigError names
    `source` and the key for anything refused or unknown."""
    ctx = {**raw, "__dir__": str(Path(source).parent), "__notes__": []}
    flat: Out = {}
    mapped, ignored = [], []
    keys = list(raw) + [k for k in DEFAULTS if k not in raw and not _covered(k, raw)]
    for key in keys:
        value = raw[key] if key in raw else DEFAULTS[key]
        rule = KEYS.get(key) or _family(key)
        if rule is None and key in SECTIONS:
            raise ConfigError(f"{source}: '{key}' is a fsdptrain section, but model_name_or_path makes this a "
                              "LLaMA-Factory YAML; write one or the other (in a fsdptrain config: model.path)")
        if rule is None:
            close = difflib.get_close_matches(str(key), list(KEYS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{source}: unknown LLaMA-Factory key '{key}'{hint} (the keys fsdptrain reads, "
                              "ignores or refuses are listed in docs/llamafactory.md)")
        if isinstance(rule, tuple):
            kind, why = rule
            if kind == "ignore" or (kind == "refuse_if_set" and not value):
                if kind == "ignore" and key in raw:
                    ignored.append((key, why))
                continue
            raise ConfigError(f"{source}: {key}: {why}")
        try:
            out = rule(value, ctx)
        except Refused as e:
            raise ConfigError(f"{source}: {key}: {e}") from None
        except (TypeError, ValueError, AttributeError):  # a value of the wrong kind, e.g. max_steps: ten
            raise ConfigError(f"{source}: {key}: {value!r} is not a value LLaMA-Factory takes here; see "
                              "docs/llamafactory.md") from None
        flat.update(out)
        if out:
            shown = ",".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in out.items())
            mapped.append((key if key in raw else f"{key}*", shown))
    ignored += ctx["__notes__"]
    return Translation(_nest(flat), mapped, ignored)


def _covered(default_key: str, raw: dict) -> bool:
    """A default that another given key already decides (adam_beta2 brings beta1's default along, ...)."""
    alternatives = {"adam_beta1": ("adam_beta2",), "save_steps": ("save_strategy",),
                    "disable_gradient_checkpointing": ("gradient_checkpointing", "recompute_granularity"),
                    "num_train_epochs": ("max_steps",)}
    return any(k in raw for k in alternatives.get(default_key, ()))


def _nest(flat: Out) -> dict:
    nested: dict = {}
    for dotted, value in flat.items():
        cur = nested
        *parents, last = dotted.split(".")
        for p in parents:
            cur = cur.setdefault(p, {})
        cur[last] = value
    return nested


def summary(t: Translation, source: str) -> str:
    """What the translation did, for the start of a run: the mapping (wrapped), then each ignored key and why."""
    import textwrap

    mapped = "  ".join(f"{k}->{v}" for k, v in t.mapped)
    lines = [f"{source}: LLaMA-Factory config translated (* its default; fsdptrain config --from-llamafactory "
             "FILE prints the result):"]
    lines += textwrap.wrap(mapped, 116, initial_indent="  ", subsequent_indent="  ", break_long_words=False,
                           break_on_hyphens=False)
    lines += [f"  ignored {k}: {why}" for k, why in t.ignored]
    return "\n".join(lines)


def announce(t: Translation, source: str) -> None:
    """Print the summary once: by rank 0 of a launched run (each rank loads the config)."""
    if os.environ.get("RANK", "0") == "0":
        log.info(summary(t, source))


def to_yaml(t: Translation, source: str) -> str:
    """The translated config as a short fsdptrain YAML, the summary above it as comments."""
    import yaml

    head = "".join(f"# {line}\n" for line in summary(t, source).splitlines())
    return head + yaml.safe_dump(t.config, sort_keys=False, allow_unicode=True)


def lf_yaml(path: Optional[str]) -> str:
    """`fsdptrain config --from-llamafactory FILE`: FILE translated (the caller checks that it loads)."""
    if path is None:
        raise ConfigError("--from-llamafactory: give the LLaMA-Factory YAML: fsdptrain config --from-llamafactory "
                          "FILE")
    raw = read_yaml(path, "a LLaMA-Factory YAML config")
    if not is_llamafactory(raw):
        raise ConfigError(f"{path}: not a LLaMA-Factory training YAML (it has no model_name_or_path)")
    return to_yaml(translate(raw, path), path)
