"""Typed configuration: dataclasses per concern, YAML loading, overrides, validation.

A run is described by one `Config`: a few top-level keys plus one section per
concern (model, data, train, parallel, checkpoint, logging, memory). Every key
is declared once with `opt(default, doc, ...)`; the doc string feeds
`fsdptrain config --dump` and the reference in docs/configuration.md.

Loading is strict: an unknown key, a wrong type or a value outside the allowed
set raises `ConfigError` with one line naming the file (or override), the
dotted key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from ..core.errors import ConfigError
from ..core.files import read_yaml
from .llamafactory import LF_TEMPLATES, announce, is_llamafactory, template_problem, translate


def parse_size(text: str, key: str) -> int:
    """A size in bytes from '5GB' / '500MB' (decimal), '2GiB' (binary), '80G' (binary, as GPU sizes are quoted)
    or a plain number of bytes. `key` names the setting or option in the one-line error."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(?:([KMGT])(i?))?(B?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"{key}: {text!r} is not a size; write e.g. 5GB, 500MB, 2GiB or 80G")
    num, unit, binary, b = float(m.group(1)), (m.group(2) or "").upper(), m.group(3), m.group(4)
    power = " KMGT".index(unit) if unit else 0
    value = int(num * (1024 if (binary or (unit and not b)) else 1000) ** power)
    if value <= 0:
        raise ConfigError(f"{key}: {text!r} must be above zero")
    return value


def opt(default: Any, doc: str, *, choices: Optional[list] = None, min: Optional[float] = None,
        check: Optional[Callable[[Any], Optional[str]]] = None) -> Any:
    """Declare a config key: default value, one-line doc, optional allowed values / minimum, and `check`: a
    function of the value returning what is wrong with it (or None)."""
    meta = {"doc": doc, "choices": choices, "min": min, "check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: _copy(d), metadata=meta)
    return field(default=default, metadata=meta)


def _copy(value: Any) -> Any:
    return yaml.safe_load(yaml.safe_dump(value))


def folder_problem(value: str) -> Optional[str]:
    """What keeps `value` from being a folder to write to: empty, or it or a folder above it is a file."""
    if not value.strip():
        return "the folder name is empty; give a folder for the run's outputs, e.g. output_dir=runs/my-run"
    path = Path(value)
    for p in (path, *path.parents):
        if p.is_file():
            where = "is a file" if p == path else f"is inside {p}, which is a file"
            return f"{value} {where}; give a folder (new or existing)"
    return None


def balance_problem(value: Any) -> Optional[str]:
    """What keeps `value` from being data.balance: none, speed, or positive per-rank weights."""
    if value in ("none", "speed"):
        return None
    if isinstance(value, list) and value:
        bad = [w for w in value if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0
               or not math.isfinite(w)]
        if not bad:
            return None
        return (f"weights must be numbers above zero, got {bad!r} in {value!r}; give every rank a positive weight "
                "(e.g. [2, 1] for a rank twice as fast as the other)")
    return f"expected none, speed or a list of per-rank weights (e.g. [2, 1]), got {value!r}"


def budget_problem(value: Any) -> Optional[str]:
    """What keeps `value` from being parallel.memory_budget_gib: a number >= 0, or a non-empty list of them."""
    values = value if isinstance(value, list) and value else [value]
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
           or v < 0]
    if bad:
        return (f"expected GiB as a number >= 0 or a list of them (one per node or per rank), got {value!r}; e.g. "
                "70 or [22, 76]")
    return None


def step_list_problem(value: list) -> Optional[str]:
    """What keeps `value` from being a list of 1-based optimizer steps."""
    bad = [s for s in value if not (isinstance(s, int) and not isinstance(s, bool) and s >= 1)]
    if bad:
        return f"expected optimizer steps (integers >= 1, e.g. [3]), got {bad!r}"
    return None


def offload_mode_problem(value: Any) -> Optional[str]:
    """What keeps `value` from being a parallel.optimizer_offload mode: false, true (host memory) or nvme."""
    if isinstance(value, bool) or value == "nvme":
        return None
    return f"expected true, false or nvme, got {value!r}"


def size_problem(value: str) -> Optional[str]:
    try:
        parse_size(value, "size")
    except ConfigError as e:
        return str(e).partition(": ")[2]
    return None


SINKS = ("tensorboard", "wandb", "mlflow")


def sinks_problem(value: list) -> Optional[str]:
    bad = [v for v in value if v not in SINKS]
    if bad:
        return f"unknown sink(s) {bad!r}; choose from {', '.join(SINKS)}"
    return None


DEMO_CONFIG = Path(__file__).parent.parent / "demo.yaml"  # what `fsdptrain train` runs without a CONFIG


@dataclass
class ModelConfig:
    path: Optional[str] = opt(None, "Local Hugging Face model folder (config.json + *.safetensors); weights load from "
                                    "it unless random_init is true.")
    hf_config: Optional[dict] = opt(None, "Inline Hugging Face config (model_type + fields) for a randomly initialised "
                                          "model; used when path is null. vocab_size defaults to the tokenizer's.")
    random_init: bool = opt(False, "Take only the architecture from model.path and start from random weights.")
    tokenizer: Optional[str] = opt(None, "Tokenizer folder; null: model.path if it has one, else the built-in "
                                         "character tokenizer.")
    attn_implementation: str = opt("sdpa", "Attention kernel passed to transformers.",
                                           choices=["sdpa", "eager", "flash_attention_2"])
    trust_remote_code: bool = opt(False, "Allow custom modelling code shipped inside model.path (off unless you trust "
                                         "the folder).")


@dataclass
class DataConfig:
    synthetic_task: str = opt("add", "Built-in generated instruction task used when no data sets are given.",
                                     choices=["reverse", "add", "sort"])
    synthetic_examples: int = opt(10000, "Number of generated examples for the built-in task.", min=1)
    max_length: int = opt(2048, "Truncate tokenised examples to this many tokens (LLaMA-Factory cutoff_len).", min=8)
    shuffle: bool = opt(True, "Shuffle examples each epoch (seeded by seed and epoch).")
    drop_last: bool = opt(True, "Drop the last incomplete global batch of an epoch (keeps every rank on the same "
                                "number of micro-steps).")
    dataset_dir: str = opt("data", "Folder holding dataset_info.json (LLaMA-Factory's registry); relative file_name "
                                   "entries resolve against it.")
    datasets: list = opt([], "Data sets to mix: names in dataset_info.json, paths (json/jsonl/parquet/csv/arrow/txt "
                             "file, folder, save_to_disk folder) or mappings {name or path, formatting, columns, tags, "
                             "num_samples}. Empty: the synthetic task.")
    max_samples: Optional[int] = opt(None, "Keep at most this many records of each data set (after "
                                           "num_samples).", min=1)
    template: str = opt("auto", "Chat template: auto uses the tokenizer's own (ChatML if it has none); or a "
                                "LLaMA-Factory template name (docs/llamafactory.md): "
                                f"{', '.join(LF_TEMPLATES)}.", check=template_problem)
    train_on_prompt: bool = opt(False, "Train on prompt tokens too (default: only assistant turns carry labels).")
    mask_history: bool = opt(False, "Train only the last assistant turn of multi-turn conversations.")
    packing: bool = opt(False, "Pack examples into rows of pack_length tokens; each example attends only to itself "
                               "(position_ids restart).")
    pack_length: Optional[int] = opt(None, "Row length for packing; null: max_length.", min=8)
    token_budget: Optional[int] = opt(None, "Cut micro-batches by padded tokens (examples x longest) instead of by "
                                            "count, so ranks process nearly equal tokens.", min=8)
    micro_batch_sizes: list = opt([], "Per-rank micro-batch sizes (one per rank, or one per node) for mixed-memory "
                                      "clusters; empty: train.micro_batch_size everywhere.")
    balance: Any = opt("none", "Split each step's global batch across ranks by tokens in proportion to their speed: "
                               "none (equal counts), speed (measured: compute time per token, re-measured every "
                               "balance_every steps), or per-rank weights, e.g. [2, 1]. The global batch and the "
                               "loss are unchanged; only which rank computes which examples.", check=balance_problem)
    balance_every: int = opt(20, "data.balance speed: steps between two measurements of the ranks' speeds (the "
                                 "first after 3 steps).", min=1)
    num_proc: int = opt(1, "Processes for tokenising (datasets.map num_proc) on each node's local rank 0.", min=1)
    cache_dir: Optional[str] = opt(None, "Tokenised-data cache; null: $FSDPTRAIN_CACHE or "
                                         "~/.cache/fsdptrain/tokenized.")
    overwrite_cache: bool = opt(False, "Tokenise again even when the cache has this data.")
    num_workers: Optional[int] = opt(None, "DataLoader worker processes building batches; null: 2 on CUDA, 0 on "
                                           "CPU.", min=0)
    val_size: float = opt(0.0, "Hold out this share (a fraction in (0, 1), rounded up) or number (a whole number) of "
                               "the examples for evaluation: a seeded split, disjoint from training, the same on any "
                               "world size (LLaMA-Factory val_size). 0: none.", min=0)
    eval_datasets: list = opt([], "Eval data sets, in the forms of data.datasets; tokenised with the same template "
                                  "and masks and cached like them. Excludes val_size.")


@dataclass
class TrainConfig:
    max_steps: Optional[int] = opt(None, "Optimizer steps to run; null: derive from epochs.", min=1)
    epochs: float = opt(1.0, "Passes over the data when max_steps is null.", min=0)
    micro_batch_size: int = opt(1, "Examples per rank per micro-step (preference pairs with train.objective dpo: "
                                   "two rows each).", min=1)
    grad_accum_steps: int = opt(1, "Micro-steps per optimizer step (gradient sync only on the last).", min=1)
    lr: float = opt(1.0e-5, "Peak learning rate.", min=0)
    schedule: str = opt("cosine", "Learning-rate schedule after warmup.", choices=["cosine", "linear", "constant"])
    warmup_steps: int = opt(0, "Linear warmup steps (takes precedence over warmup_ratio when > 0).", min=0)
    warmup_ratio: float = opt(0.0, "Warmup as a fraction of max_steps.", min=0)
    min_lr_ratio: float = opt(0.0, "Final learning rate as a fraction of lr (cosine/linear).", min=0)
    weight_decay: float = opt(0.0, "AdamW weight decay (never applied to norms and biases).", min=0)
    adam_betas: list = opt([0.9, 0.95], "AdamW (beta1, beta2).")
    adam_eps: float = opt(1.0e-8, "AdamW epsilon.", min=0)
    loss_chunk_tokens: int = opt(0, "Compute lm_head + cross-entropy (and their gradients, fused) this many tokens at "
                                    "a time so full-vocabulary fp32 logits never exist at once; 0 computes full "
                                    "logits.", min=0)
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm to this; 0 disables clipping.", min=0)
    router_aux_loss_coef: Optional[float] = opt(None, "MoE models: weight of the router's load-balancing loss added "
                                                      "to the objective (transformers' own); null: the model "
                                                      "config's router_aux_loss_coef; 0: off. See docs/moe.md.",
                                                min=0)
    on_nonfinite: str = opt("stop", "Non-finite loss or grad norm: stop the run (naming step and rank) or skip the "
                                    "update.", choices=["stop", "skip"])
    eval_every: int = opt(0, "Evaluate on the eval data every N optimizer steps (and after the last step whenever "
                             "eval data exists); 0: only after the last step.", min=0)
    eval_max_batches: int = opt(0, "Evaluate only the first N x eval micro-batch eval examples (the same ones on any "
                                   "world size); 0: all of them.", min=0)
    eval_micro_batch_size: Optional[int] = opt(None, "Eval examples per rank per forward; null: "
                                                     "train.micro_batch_size.", min=1)
    objective: str = opt("sft", "What a step optimises: sft (token cross-entropy over target tokens; pretraining "
                                "too), dpo (preference pairs: the preference.* loss, data with ranking: true; "
                                "docs/preference.md) or rm (a reward model: a scalar score head trained on the "
                                "same pairs with -log sigmoid(chosen - rejected)) or kto (examples tagged desirable "
                                "or not, data with a kto_tag column: KTO's loss against a reference model with a KL "
                                "estimate from mismatched responses) (LLaMA-Factory stage).",
                    choices=["sft", "dpo", "rm", "kto"])


@dataclass
class ParallelConfig:
    device: str = opt("auto", "auto: CUDA + NCCL when GPUs exist, else CPU + gloo.", choices=["auto", "cpu", "cuda"])
    precision: str = opt("auto", "auto: bf16-mixed on CUDA, fp32 on CPU. bf16-mixed: bf16 params/compute, fp32 master "
                                 "weights and gradient reduction. bf16-pure: everything bf16.",
                                 choices=["auto", "bf16-mixed", "fp32", "bf16-pure"])
    reduce_dtype: str = opt("fp32", "dtype of the gradient reduce-scatter (and all-reduce across replicas) under "
                                    "bf16-mixed and bf16-pure: fp32 sums in full precision; bf16 halves the "
                                    "gradient traffic (for communication-bound multi-node runs) at the cost of "
                                    "bf16 rounding in the sum. Not with precision fp32.", choices=["fp32", "bf16"])
    reshard_after_forward: bool = opt(True, "Free gathered block weights after forward (ZeRO-3); false keeps them "
                                            "until backward (ZeRO-2-like, more memory, less traffic).")
    cpu_offload: bool = opt(False, "Keep sharded params, grads and optimizer state in CPU memory (FSDP2 "
                                   "CPUOffloadPolicy; needs CUDA).")
    activation_checkpointing: str = opt("none", "Recompute block activations in backward: none, full (every block), "
                                                "every_k (every k-th block), selective (every block, but keep matmul "
                                                "and attention outputs; recompute only cheap element-wise ops) or auto "
                                                "(the least recomputation whose estimated peak fits "
                                                "parallel.memory_budget_gib: blocks turn selective first, then full).",
                                                choices=["none", "full", "every_k", "selective", "auto"])
    activation_checkpointing_k: int = opt(2, "k for activation_checkpointing: every_k.", min=1)
    memory_budget_gib: Any = opt(0.0, "activation_checkpointing: auto plans each rank for this peak allocated GPU "
                                      "memory (GiB): one value, or a list with one per node or one per rank (mixed "
                                      "GPUs); 0: the rank's own GPU memory less the estimator's allowance for CUDA "
                                      "context, NCCL and fragmentation (on CPU a budget must be given).",
                                      check=budget_problem)
    optimizer_offload: bool | str = opt(False, "Keep AdamW state in CPU memory and run the update there; "
                                                     "parameters and gradients stay on the GPU (less GPU memory than "
                                                     "none, much faster than cpu_offload). nvme: the same update, "
                                                     "but the moments live in files under parallel.offload_dir and "
                                                     "stream through parallel.offload_buffer_size of host memory "
                                                     "(docs/performance.md).", check=offload_mode_problem)
    offload_dir: Optional[str] = opt(None, "optimizer_offload: nvme: a node-local folder (an NVMe drive) for the "
                                           "AdamW moments; fsdptrain writes only its own marked subfolder per run "
                                           "and rank there and deletes it at the end.")
    host_memory_check: bool = opt(True, "With cpu_offload or optimizer_offload: before any weight loads, compare the "
                                        "host memory the node's ranks need (the memory estimator's CPU line) with "
                                        "what the node has available (MemAvailable) and stop in one line if it "
                                        "will not fit; false starts anyway.")
    offload_buffer_size: str = opt("256MiB", "optimizer_offload: nvme: all the host memory the optimizer holds "
                                             "(read-ahead, update, write-behind): buffers of the moments, "
                                             "gradients and shards of up to 16 MiB of parameters each, at least 3 "
                                             "(3 x 16 bytes x the largest parameter shard if that is more).",
                                   check=lambda v: size_problem(v))
    compile: bool = opt(False, "torch.compile each transformer block.")
    compile_backend: str = opt("inductor", "torch.compile backend for compile: true.",
                                           choices=["inductor", "aot_eager", "eager"])
    prefetch_blocks: int = opt(0, "Explicitly prefetch (all-gather) this many next blocks in forward and backward; 0 "
                                  "keeps FSDP2's implicit prefetching.", min=0)
    sync_grads_every_micro_step: bool = opt(True, "Reduce-scatter gradients on every micro-step (ZeRO-3 memory). false "
                                                  "skips the reduction on all but the last micro-step: less traffic, "
                                                  "but FSDP then holds every parameter's unsharded fp32 gradient "
                                                  "between micro-steps (4 bytes x all parameters per GPU).")
    sharding: str = opt("full", "full: shard parameters over all ranks (ZeRO-3). hybrid: shard within a node, "
                                "replicate across nodes (2-D mesh; only gradient all-reduce crosses nodes).",
                                choices=["full", "hybrid"])
    shard_group_size: Optional[int] = opt(None, "hybrid: ranks per shard group; null: the processes of one node "
                                                "(LOCAL_WORLD_SIZE). Set it to try hybrid layouts on one host.", min=1)
    context_parallel: int = opt(1, "Context parallelism (Ulysses): N consecutive ranks take the same rows and each "
                                   "one contiguous 1/N of the sequence; attention swaps sequence for heads with an "
                                   "all-to-all (docs/long-context.md). N must divide the world size and the "
                                   "attention heads; 1: off.", min=1)
    timeout_minutes: float = opt(30.0, "Process-group timeout: a collective waiting longer fails instead of "
                                       "hanging.", min=0.1)


@dataclass
class CheckpointConfig:
    save_every: int = opt(0, "Save a sharded checkpoint to output_dir/checkpoints every N optimizer steps; 0: only at "
                             "the end.", min=0)
    save_at_end: bool = opt(True, "Save a checkpoint after the last step.")
    keep_last: int = opt(3, "Keep the newest K complete checkpoints and delete older ones; 0 keeps all.", min=0)
    resume: str = opt("auto", "auto: continue from the newest complete checkpoint in output_dir (fresh start if none); "
                              "none: always start fresh; or the path of a checkpoint folder.")
    async_save: bool = opt(False, "Copy the checkpoint to CPU memory and write it in a background thread while "
                                  "training continues (costs one extra CPU copy of the rank's shards).")
    save_before_minutes: float = opt(5.0, "With a job time limit (SLURM_JOB_END_TIME, or wall_time_minutes), save a "
                                          "checkpoint and stop cleanly this many minutes before it runs out.", min=0)
    wall_time_minutes: Optional[float] = opt(None, "The job's time limit in minutes from the start, when no "
                                                   "SLURM_JOB_END_TIME says it; null: none.", min=0)
    export_hf: bool = opt(False, "At the end of training write a Hugging Face model folder (safetensors) to "
                                 "output_dir/hf.")
    export_dtype: str = opt("auto", "Weight dtype of exported Hugging Face folders; auto: bf16 when training in bf16, "
                                    "else fp32.", choices=["auto", "fp32", "bf16"])
    export_max_shard_size: str = opt("5GB", "Largest safetensors file of an export (e.g. 5GB, 500MB); bigger models "
                                            "get several files and an index.")
    keep_best: bool = opt(False, "Keep the checkpoint with the lowest eval loss (evaluated at its step) out of "
                                 "keep_last pruning; checkpoints/best.json names it (fsdptrain export RUN --best).")


def _target_problem(value: Any) -> Optional[str]:
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        return (f"expected module names (a list, or a comma-separated string such as q_proj,v_proj) or all, got "
                f"{value!r}")
    return None


@dataclass
class LoraConfig:
    rank: int = opt(8, "LoRA rank r of each adapter (LLaMA-Factory lora_rank).")
    alpha: Optional[float] = opt(None, "LoRA alpha: adapters are scaled by alpha / rank (alpha / sqrt(rank) with "
                                       "use_rslora); null: 2 x rank (LLaMA-Factory lora_alpha).")
    dropout: float = opt(0.0, "Dropout on each adapter's input (LLaMA-Factory lora_dropout).", min=0)
    target: Any = opt("all", "Linear layers that get adapters: module names matched by their last part(s) (q_proj,"
                             "v_proj, or a list), or all / all-linear: every linear layer of the transformer blocks "
                             "(LLaMA-Factory lora_target).", check=_target_problem)
    use_rslora: bool = opt(False, "rsLoRA scaling alpha / sqrt(rank) instead of alpha / rank (LLaMA-Factory "
                                  "use_rslora).")
    modules_to_save: list = opt([], "Modules trained in full next to the adapters, e.g. [embed_tokens, lm_head] "
                                    "after adding tokens (LLaMA-Factory additional_target; PEFT modules_to_save).")


@dataclass
class FreezeConfig:
    trainable_layers: int = opt(2, "Train the last k transformer blocks (negative: the first |k|) "
                                   "(LLaMA-Factory freeze_trainable_layers).")
    trainable_modules: Any = opt("all", "Which modules of the trainable blocks train: all, or name patterns such as "
                                        "mlp,self_attn (LLaMA-Factory freeze_trainable_modules).",
                                 check=_target_problem)
    extra_modules: list = opt([], "Modules outside the blocks that train too, e.g. [embed_tokens, norm, lm_head] "
                                  "(LLaMA-Factory freeze_extra_modules).")


@dataclass
class FinetuneConfig:
    method: str = opt("full", "full: train every weight; lora: train low-rank adapters on a frozen base (finetune.lora"
                              ".*); freeze: train only some blocks and modules (finetune.freeze.*) "
                              "(LLaMA-Factory finetuning_type).", choices=["full", "lora", "freeze"])
    lora: LoraConfig = field(default_factory=LoraConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)


PREF_LOSSES = ["sigmoid", "ipo", "hinge", "orpo", "simpo"]


@dataclass
class PreferenceConfig:
    loss: str = opt("sigmoid", "Preference loss of train.objective dpo: sigmoid (DPO), ipo, hinge (against a "
                               "reference model), orpo, simpo (no reference model) (LLaMA-Factory pref_loss).",
                    choices=PREF_LOSSES)
    beta: float = opt(0.1, "The loss's beta: DPO's KL weight, IPO's tau, ORPO's odds-ratio weight, SimPO's reward "
                           "scale (LLaMA-Factory pref_beta).")
    ftx: float = opt(0.0, "Weight of an SFT term on the chosen response (its mean token negative log-likelihood) "
                          "added to each pair's loss (LLaMA-Factory pref_ftx).", min=0)
    label_smoothing: float = opt(0.0, "sigmoid only: the assumed share of flipped labels, in [0, 0.5) (conservative "
                                      "DPO; LLaMA-Factory dpo_label_smoothing).", min=0)
    simpo_gamma: Optional[float] = opt(None, "simpo only: the target reward margin; null: 0.5 (LLaMA-Factory "
                                             "simpo_gamma).")
    kto_chosen_weight: float = opt(1.0, "train.objective kto only: the weight of a desirable example's loss "
                                        "(LLaMA-Factory kto_chosen_weight).", min=0)
    kto_rejected_weight: float = opt(1.0, "train.objective kto only: the weight of an undesirable example's loss "
                                          "(LLaMA-Factory kto_rejected_weight).", min=0)
    ref_model: Optional[str] = opt(None, "A Hugging Face model folder for the reference model (sigmoid, ipo, hinge), "
                                         "of the policy's family and vocabulary; built as a frozen sharded copy, "
                                         "also under LoRA and freeze; null: the starting model (LLaMA-Factory "
                                         "ref_model).")


@dataclass
class LoggingConfig:
    log_every: int = opt(1, "Write metrics every N optimizer steps.", min=1)
    tensorboard: bool = opt(True, "Deprecated switch kept for old configs: false drops tensorboard from "
                                  "logging.report_to.")
    report_to: list = opt(["tensorboard"], "Metric sinks: any of tensorboard (output_dir/tb), wandb, mlflow "
                                           "(optional extras, imported only when listed). metrics.jsonl is always "
                                           "written.", check=lambda v: sinks_problem(v))
    run_name: Optional[str] = opt(None, "Run name for W&B and MLflow; null: the output_dir's folder name.")
    wandb_project: str = opt("fsdptrain", "W&B project (WANDB_MODE=offline keeps the run local).")
    mlflow_tracking_uri: Optional[str] = opt(None, "MLflow tracking URI (e.g. file:./mlruns); null: "
                                                   "MLFLOW_TRACKING_URI or MLflow's default.")
    mlflow_experiment: str = opt("fsdptrain", "MLflow experiment name.")
    progress: str = opt("auto", "Rank-0 progress: bar (tqdm), lines (one line per log step), none; auto: bar on a "
                                "terminal, lines otherwise.", choices=["auto", "bar", "lines", "none"])
    peak_tflops: Optional[float] = opt(None, "Per-device peak bf16 TFLOP/s for MFU; null: guess from the GPU name "
                                             "(H100/H200 SXM 989, H100/H200 NVL 835, H100 PCIe 756, "
                                             "A100 312).", min=0)


@dataclass
class MemoryConfig:
    track_peak: bool = opt(True, "Record memory per rank at each phase (step start, forward, backward, optimizer) to "
                                 "output_dir/memory/rank{R}.jsonl and gather the peaks to rank 0 every log step (CUDA "
                                 "allocator / CPU RSS).")
    per_module: bool = opt(False, "Also record memory after each FSDP block's forward and backward (a per-block "
                                  "timeline; costs time).")
    imbalance_warn: float = opt(1.2, "Warn when one rank's peak exceeds the median rank's peak by this factor (names "
                                     "rank, phase and likely cause).", min=1.0)
    snapshot_steps: list = opt([], "Optimizer steps (1-based) at which every CUDA rank records allocation history and "
                                   "dumps output_dir/memory/snapshot_step{S}_rank{R}.pickle.")
    breakdown_steps: list = opt([], "Optimizer steps (1-based) at which every rank measures its memory by category "
                                    "(parameters, gradients, optimizer state, activations, temporaries, collective "
                                    "buffers) and phase with torch's FSDPMemTracker and writes output_dir/memory/"
                                    "breakdown_step{S}_rank{R}.json; `fsdptrain mem report` sets the ranks side by "
                                    "side. Any device; the tracked step runs slower.", check=step_list_problem)
    snapshot_max_entries: int = opt(200000, "Allocation-history entries kept per snapshot (ring buffer).", min=1)
    oom_postmortem: bool = opt(True, "On out-of-memory the failing rank writes a snapshot, its stats and a readable "
                                     "post-mortem to output_dir/memory/, and all ranks stop.")
    record_history: bool = opt(False, "Record CUDA allocation stacks for the whole run so an OOM post-mortem names "
                                      "source lines (slower).")


@dataclass
class Config:
    output_dir: str = opt("runs/default", "Run directory: resolved config, metrics.jsonl, TensorBoard events.",
                          check=folder_problem)
    seed: int = opt(42, "Seed for model init, data order and synthetic data.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)


# ----------------------------------------------------------------------------- loading


# LLaMA-Factory / HF Trainer names users bring along, for "did you mean" hints.
FOREIGN_KEYS = {
    "learning_rate": "train.lr", "per_device_train_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps", "num_train_epochs": "train.epochs",
    "lr_scheduler_type": "train.schedule", "warmup_steps": "train.warmup_steps", "warmup_ratio": "train.warmup_ratio",
    "max_grad_norm": "train.max_grad_norm", "weight_decay": "train.weight_decay", "max_steps": "train.max_steps",
    "cutoff_len": "data.max_length", "dataset": "data.datasets", "dataset_dir": "data.dataset_dir",
    "preprocessing_num_workers": "data.num_proc", "model_name_or_path": "model.path",
    "gradient_checkpointing": "parallel.activation_checkpointing", "bf16": "parallel.precision",
    "logging_steps": "logging.log_every", "save_steps": "checkpoint.save_every",
    "save_total_limit": "checkpoint.keep_last",
    "resume_from_checkpoint": "checkpoint.resume", "deepspeed": "parallel (FSDP2 settings: sharding, cpu_offload)",
    "finetuning_type": "finetune.method", "lora_rank": "finetune.lora.rank", "lora_alpha": "finetune.lora.alpha",
    "lora_dropout": "finetune.lora.dropout", "lora_target": "finetune.lora.target",
    "use_rslora": "finetune.lora.use_rslora", "additional_target": "finetune.lora.modules_to_save",
    "freeze_trainable_layers": "finetune.freeze.trainable_layers",
    "freeze_trainable_modules": "finetune.freeze.trainable_modules",
    "freeze_extra_modules": "finetune.freeze.extra_modules",
}


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-5` (no dot) as a float, as every user expects."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def refuse_config_flag(args: list[str] | tuple[str, ...], usage: str) -> None:
    """`--config FILE` (a LLaMA-Factory / HF Trainer habit) gets a one-line hint: the file is the first argument."""
    given = list(args[:list(args).index("--")] if "--" in args else args)
    if any(a == "--config" or a.startswith("--config=") for a in given):
        raise ConfigError(f"--config: give the config file as the first argument: {usage} FILE [key=value ...]")


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = (),
                quiet: bool = False) -> Config:
    """Defaults, then the YAML file (the built-in demo when None), then `key.path=value` overrides. A
    LLaMA-Factory YAML is translated first, its summary printed unless `quiet`."""
    cfg = Config()
    if path is None:
        path = str(DEMO_CONFIG)
    if path is not None:
        raw = read_yaml(path, "a YAML config file", base_loader=_Loader)  # missing, folder, not UTF-8, ...
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
        if is_llamafactory(raw):  # a LLaMA-Factory training YAML: its keys as fsdptrain's (lfconfig.py)
            lf = translate(raw, str(path))
            if not quiet:
                announce(lf, str(path))
            raw = lf.config
        _apply(cfg, raw, source=str(path), prefix="")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key.path=value, e.g. train.lr=1e-4")
        key, _, text = item.partition("=")
        try:
            value = yaml_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        nested: dict = {}
        cur = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
        cur[parts[-1]] = value
        _apply(cfg, nested, source=f"override '{item}'", prefix="")
    validate(cfg, source=str(path) if path else "config")
    return cfg


def _apply(obj: Any, raw: dict, source: str, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            known = difflib.get_close_matches(str(key), list(FOREIGN_KEYS), n=1, cutoff=0.75)
            hint = (f"; did you mean '{prefix}{close[0]}'?" if close else
                    f"; did you mean '{FOREIGN_KEYS[known[0]]}'?" if known else "")
            where = f"'{prefix[:-1]}'" if prefix else "the top level"
            raise ConfigError(
                f"{source}: unknown key '{dotted}'{hint} (keys in {where}: {', '.join(fields)})"
            )
        f = fields[key]
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{dotted}' is a section; expected a mapping of keys, got {value!r}")
            _apply(getattr(obj, key), value, source, prefix=f"{dotted}.")
            continue
        value = _coerce(value, typ, f, source, dotted)
        current = getattr(obj, key)
        if isinstance(value, dict) and isinstance(current, dict) and source.startswith("override"):
            value = {**current, **value}  # `model.hf_config.num_hidden_layers=2` changes one field
        setattr(obj, key, value)


def _coerce(value: Any, typ: Any, f: dataclasses.Field, source: str, dotted: str) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        # bool | str (parallel.optimizer_offload): the kind the value is; its `check` says what is allowed
        fits = [a for a in kinds if isinstance(value, a) and not (a is int and isinstance(value, bool))]
        check = f.metadata.get("check")
        if len(kinds) > 1 and not fits and value is not None and check is not None and check(value):
            raise ConfigError(f"{source}: {dotted}: {check(value)}")
        typ = fits[0] if fits else kinds[0]
        origin = typing.get_origin(typ)
    if value is None:
        raise ConfigError(f"{source}: {dotted}: must not be null ({_describe(typ, f)})")
    ok = True
    if typ is bool:
        ok = isinstance(value, bool)
    elif typ is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif typ is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                ok = False
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            ok = False
        if ok:
            value = float(value)
            if not math.isfinite(value):
                lo = f.metadata.get("min")
                limits = ([f"default {f.default!r}"] if f.default is not None else []) + \
                    ([f"minimum {lo}"] if lo is not None else [])
                raise ConfigError(f"{source}: {dotted}: {value!r} is not a finite number; give a finite number"
                                  + (f" ({', '.join(limits)})" if limits else ""))
    elif typ is str:
        ok = isinstance(value, str)
    elif typ is list or origin is list:
        ok = isinstance(value, list)
    elif typ is dict or origin is dict:
        ok = isinstance(value, dict)
    if not ok:
        raise ConfigError(
            f"{source}: {dotted}: expected {_describe(typ, f)}, got {value!r} ({type(value).__name__})"
        )
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{source}: {dotted}: {value!r} is not allowed; choose one of {', '.join(map(str, choices))}")
    lo = f.metadata.get("min")
    if lo is not None and isinstance(value, (int, float)) and value < lo:
        raise ConfigError(f"{source}: {dotted}: {value!r} is below the minimum {lo}")
    check = f.metadata.get("check")
    problem = check(value) if check is not None else None
    if problem:
        raise ConfigError(f"{source}: {dotted}: {problem}")
    return value


def _check_values(obj: Any, source: str, prefix: str = "") -> None:
    """Run every key's `check` on its current value."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_values(value, source, f"{prefix}{f.name}.")
            continue
        check = f.metadata.get("check")
        problem = check(value) if check is not None and value is not None else None
        if problem:
            raise ConfigError(f"{source}: {prefix}{f.name}: {problem}")


def _describe(typ: Any, f: dataclasses.Field) -> str:
    if f.metadata.get("choices"):
        return "one of " + ", ".join(map(str, f.metadata["choices"]))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping"}
    return names.get(typ, names.get(typing.get_origin(typ), str(typ)))


def validate(cfg: Config, source: str = "config") -> None:
    """Checks that involve several keys."""
    _check_values(cfg, source)  # also the defaults no file or override set
    m = cfg.model
    if m.path is None and not m.hf_config:
        raise ConfigError(f"{source}: set model.path (a local Hugging Face folder) "
                          "or model.hf_config (an inline config)")
    if m.path is None and m.random_init is False and m.hf_config and "model_type" not in m.hf_config:
        raise ConfigError(f"{source}: model.hf_config needs a model_type (e.g. llama, qwen2, mistral, gemma)")
    if m.attn_implementation.startswith("flash_attention") and cfg.parallel.precision == "fp32":
        raise ConfigError(f"{source}: model.attn_implementation: {m.attn_implementation} runs in bf16/fp16 only and "
                          "parallel.precision is fp32; set parallel.precision=bf16-mixed (or auto) or "
                          "model.attn_implementation=sdpa")
    if cfg.parallel.cpu_offload and cfg.parallel.optimizer_offload:
        raise ConfigError(f"{source}: parallel.cpu_offload already keeps the optimizer state on the CPU; "
                          "set parallel.optimizer_offload=false (or cpu_offload=false to keep parameters on the GPU)")
    validate_offload(cfg.parallel, source)
    t = cfg.train
    if len(t.adam_betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in t.adam_betas):
        raise ConfigError(f"{source}: train.adam_betas: expected two numbers in [0, 1), got {t.adam_betas!r}")
    if t.max_steps is None and t.epochs <= 0:
        raise ConfigError(f"{source}: train.epochs: {t.epochs} trains nothing; set train.epochs above 0 (e.g. 1) "
                          "or set train.max_steps")
    if t.warmup_ratio >= 1:
        raise ConfigError(f"{source}: train.warmup_ratio: {t.warmup_ratio} must be below 1")
    bad_steps = [s for s in cfg.memory.snapshot_steps
                 if not (isinstance(s, int) and not isinstance(s, bool) and s >= 1)]
    if bad_steps:
        raise ConfigError(f"{source}: memory.snapshot_steps: expected optimizer steps (integers >= 1), "
                          f"got {bad_steps!r}")
    if t.min_lr_ratio > 1:
        raise ConfigError(f"{source}: train.min_lr_ratio: {t.min_lr_ratio} must be at most 1")
    check_eval(cfg, source)
    validate_context_parallel(cfg, source)

    parse_size(cfg.checkpoint.export_max_shard_size, f"{source}: checkpoint.export_max_shard_size")
    validate_finetune(cfg.finetune, source, cfg.checkpoint.export_hf)
    validate_preference(cfg, source)


def validate_context_parallel(cfg: Config, source: str) -> None:
    """parallel.context_parallel > 1: what its first version holds (docs/long-context.md); the world size and the
    model's heads are checked at start-up, where they are known."""
    n = cfg.parallel.context_parallel
    if n == 1:
        return
    where = f"{source}: parallel.context_parallel: {n}"
    d = cfg.data
    same_rows = "the ranks of a context group must take the same rows, cut the same way"
    for key, value, off, why in (
            ("data.token_budget", d.token_budget is not None, "null", same_rows),
            ("data.micro_batch_sizes", bool(d.micro_batch_sizes), "[]", same_rows),
            ("data.balance", d.balance != "none", "none", same_rows),
            ("parallel.compile", cfg.parallel.compile, "false",
             "compiled blocks around the Ulysses exchange and its per-micro-batch mask are not built or tested")):
        if value:
            raise ConfigError(f"{where}: does not work with {key} yet ({why}); set {key}={off} or "
                              "parallel.context_parallel=1")
    if cfg.model.attn_implementation != "sdpa":
        raise ConfigError(f"{where}: the attention inside Ulysses is sdpa, not model.attn_implementation="
                          f"{cfg.model.attn_implementation}; set model.attn_implementation=sdpa or "
                          "parallel.context_parallel=1")


def validate_offload(p: ParallelConfig, source: str) -> None:
    """parallel.offload_dir and offload_buffer_size belong to optimizer_offload: nvme, which needs the folder."""
    if p.optimizer_offload == "nvme":
        if p.offload_dir is None or not p.offload_dir.strip():
            raise ConfigError(f"{source}: parallel.optimizer_offload: nvme needs parallel.offload_dir; give a "
                              "node-local folder on an NVMe drive, e.g. parallel.offload_dir=/local_nvme/fsdptrain")
        return
    if p.offload_dir is not None:
        raise ConfigError(f"{source}: parallel.offload_dir is set but parallel.optimizer_offload is "
                          f"{str(p.optimizer_offload).lower()}; set parallel.optimizer_offload=nvme, or remove "
                          "offload_dir")
    if p.offload_buffer_size != ParallelConfig().offload_buffer_size:
        raise ConfigError(f"{source}: parallel.offload_buffer_size belongs to parallel.optimizer_offload: nvme; set "
                          "it, or remove offload_buffer_size")


PAIRWISE = ("dpo", "rm")  # objectives trained on preference pairs (ranking data)
TWO_ROWS = (*PAIRWISE, "kto")  # objectives whose data item is two rows of one forward (kto: the example, its KL row)
KTO_KEYS = ("kto_chosen_weight", "kto_rejected_weight")


def validate_preference(cfg: Config, source: str) -> None:
    """Preference settings: only with train.objective dpo or kto, each only with the loss (or objective) it belongs
    to, and the data and step options a pair (a KTO example with its KL row) cannot take refused."""
    p, d = cfg.preference, cfg.data
    if cfg.train.objective == "rm":
        validate_reward(cfg, source)
        return
    objective = cfg.train.objective
    if objective not in ("dpo", "kto"):
        if p != PreferenceConfig():
            raise ConfigError(f"{source}: preference.* is set but train.objective is {objective}; set "
                              "train.objective=dpo (or kto), or remove the preference settings")
        return
    if objective == "kto":
        validate_kto(p, source)
    else:
        for key in KTO_KEYS:
            if getattr(p, key) != getattr(PreferenceConfig(), key):
                raise ConfigError(f"{source}: preference.{key} belongs to train.objective kto, not dpo; remove it "
                                  "or set train.objective=kto")
    if p.label_smoothing and p.loss != "sigmoid":
        raise ConfigError(f"{source}: preference.label_smoothing belongs to the sigmoid loss, not {p.loss}; remove "
                          "it or set preference.loss=sigmoid")
    if p.label_smoothing >= 0.5:
        raise ConfigError(f"{source}: preference.label_smoothing: {p.label_smoothing} must be below 0.5")
    if p.simpo_gamma is not None and p.loss != "simpo":
        raise ConfigError(f"{source}: preference.simpo_gamma belongs to the simpo loss, not {p.loss}; remove it or "
                          "set preference.loss=simpo")
    if p.ref_model is not None and p.loss in ("orpo", "simpo"):
        raise ConfigError(f"{source}: preference.ref_model belongs to the losses with a reference model (sigmoid, "
                          f"ipo, hinge), not {p.loss}; remove it or set another preference.loss")
    if p.beta <= 0:
        raise ConfigError(f"{source}: preference.beta: {p.beta} must be above 0 (e.g. 0.1)")
    rows = "a pair's chosen and rejected rows" if objective == "dpo" else "an example and its KL row"
    refused = [("data.packing", d.packing, f"{rows} must run in one forward, unpacked; set data.packing=false"),
               ("data.train_on_prompt", d.train_on_prompt, "preference losses score the responses only; remove it"),
               ("data.mask_history", d.mask_history, "a pair trains only its last turn already; remove it"),
               ("train.loss_chunk_tokens", cfg.train.loss_chunk_tokens, "the chunked loss head computes the token "
                                                                        "cross-entropy; set it to 0"),
               ("finetune.lora.modules_to_save", cfg.finetune.lora.modules_to_save,
                "modules trained in full would change the reference model (the policy with adapters off); "
                "remove them")]
    for key, value, why in refused:
        if value:
            raise ConfigError(f"{source}: {key} with train.objective {objective}: {why}")


def validate_kto(p: PreferenceConfig, source: str) -> None:
    """KTO has one loss: the dpo losses' options are refused with it, not ignored."""
    default = PreferenceConfig()
    for key in ("loss", "label_smoothing", "simpo_gamma"):
        if getattr(p, key) != getattr(default, key):
            raise ConfigError(f"{source}: preference.{key} belongs to train.objective dpo, not kto (KTO has one "
                              "loss); remove it")


def validate_reward(cfg: Config, source: str) -> None:
    """A reward model trains on pairs with its own loss: the dpo settings and what would split a pair refused."""
    if cfg.preference != PreferenceConfig():
        raise ConfigError(f"{source}: preference.* belongs to train.objective dpo, not rm (a reward model's loss "
                          "has no settings); remove the preference settings")
    refused = [("data.packing", cfg.data.packing, "a pair's chosen and rejected rows must run in one forward, "
                                                  "unpacked; set data.packing=false"),
               ("train.loss_chunk_tokens", cfg.train.loss_chunk_tokens, "a reward model has no token loss (it "
                                                                        "scores the last token); set it to 0"),
               ("train.router_aux_loss_coef", cfg.train.router_aux_loss_coef, "transformers' sequence-"
                                                                              "classification models return no "
                                                                              "router loss; remove it")]
    for key, value, why in refused:
        if value:
            raise ConfigError(f"{source}: {key} with train.objective rm: {why}")


def validate_finetune(f: FinetuneConfig, source: str, export_hf: bool = False) -> None:
    """Settings of one method given while another is chosen are refused, not ignored."""
    if f.method != "lora" and f.lora != LoraConfig():
        raise ConfigError(f"{source}: finetune.lora.* is set but finetune.method is {f.method}; set "
                          "finetune.method=lora, or remove the finetune.lora settings")
    if f.method != "freeze" and f.freeze != FreezeConfig():
        raise ConfigError(f"{source}: finetune.freeze.* is set but finetune.method is {f.method}; set "
                          "finetune.method=freeze, or remove the finetune.freeze settings")
    if f.method == "lora" and export_hf:
        raise ConfigError(f"{source}: checkpoint.export_hf: true writes a full model and finetune.method is lora; "
                          "set checkpoint.export_hf=false and run fsdptrain export RUN --out DIR (a PEFT adapter) "
                          "or add --merge (a merged model) after training")
    if f.lora.rank <= 0:
        raise ConfigError(f"{source}: finetune.lora.rank: {f.lora.rank} must be a positive integer (e.g. 8 or 16)")
    if f.lora.alpha is not None and f.lora.alpha <= 0:
        raise ConfigError(f"{source}: finetune.lora.alpha: {f.lora.alpha} must be above 0 (null: 2 x rank)")
    if f.lora.dropout >= 1:
        raise ConfigError(f"{source}: finetune.lora.dropout: {f.lora.dropout} must be below 1")
    if f.method == "freeze" and f.freeze.trainable_layers == 0 and not f.freeze.extra_modules:
        raise ConfigError(f"{source}: finetune.freeze.trainable_layers: 0 with no extra_modules trains nothing; "
                          "give k > 0 (last k blocks), k < 0 (first |k|) or finetune.freeze.extra_modules")


def check_eval(cfg: Config, source: str) -> None:
    """Evaluation keys that need eval data or exclude each other."""
    d, t = cfg.data, cfg.train
    if d.val_size and d.eval_datasets:
        raise ConfigError(f"{source}: data.val_size and data.eval_datasets exclude each other; "
                          "set one (val_size splits data.datasets, eval_datasets are separate data)")
    has_eval = bool(d.val_size or d.eval_datasets)
    if t.eval_every and not has_eval:
        raise ConfigError(f"{source}: train.eval_every: {t.eval_every} needs eval data; set data.val_size "
                          "(e.g. 0.05) or data.eval_datasets")
    if cfg.checkpoint.keep_best and not has_eval:
        raise ConfigError(f"{source}: checkpoint.keep_best needs eval data; set data.val_size (e.g. 0.05) or "
                          "data.eval_datasets, and train.eval_every")


# ----------------------------------------------------------------------------- output


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config, with_docs: bool = True) -> str:
    """The effective config as YAML, each key preceded by its one-line doc."""
    lines: list[str] = []

    def emit(obj: Any, indent: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                lines.append(f"{indent}{f.name}:")
                emit(value, indent + "  ")
                continue
            if with_docs:
                doc = f.metadata.get("doc", "")
                if f.metadata.get("choices"):
                    doc += f" [{' | '.join(map(str, f.metadata['choices']))}]"
                lines.append(f"{indent}# {doc}")
            text = yaml.safe_dump({f.name: value}, default_flow_style=True, width=10_000).strip()
            if text.startswith("{") and text.endswith("}"):
                text = text[1:-1]
            lines.append(f"{indent}{text}")

    emit(cfg, "")
    return "\n".join(lines) + "\n"


def reference_rows() -> list[tuple[str, str, str]]:  # noqa: C901
    """(dotted key, default, doc) for every key: docs/configuration.md's reference."""
    rows = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
                continue
            doc = f.metadata.get("doc", "")
            if f.metadata.get("choices"):
                doc += f" One of: {', '.join(map(str, f.metadata['choices']))}."
            default = (yaml.safe_dump(value, default_flow_style=True).strip()
                       .removesuffix("\n...").removesuffix("...").strip())
            rows.append((f"{prefix}{f.name}", default, doc))

    walk(Config(), "")
    return rows
