"""Resolved run facts: what a configuration means on a given cluster, worked out once.

The trainer (parallelize.apply_fsdp) and the memory estimator both need the
same answers: the precision `auto` resolves to on this device, which
checkpointing mode each block gets, how many ranks a parameter is sharded
over, and whether the options can run on this device at all. They live here,
below both, so neither has to import the other.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config.schema import Config, ParallelConfig
from ..core.errors import ConfigError


def matmul_tf32(precision: str, device_type: str) -> bool:
    """Whether fp32 matmuls use TF32 tensor cores: on CUDA with precision fp32 (about 8x the fp32 matmul rate on
    H100; inputs rounded to a 10-bit mantissa, fp32 accumulation). cuBLAS honours NVIDIA_TF32_OVERRIDE=0 to turn
    it off. CPU runs are unchanged."""
    return device_type == "cuda" and precision == "fp32"


def resolve_precision(precision: str, device_type: str) -> str:
    if precision == "auto":
        return "bf16-mixed" if device_type == "cuda" else "fp32"
    return precision


def checkpoint_modes(n_blocks: int, mode: str, k: int) -> list[str]:
    """Per-block checkpointing for a configured mode (auto is planned from a memory budget, not here)."""
    if mode == "every_k":
        return ["full" if i % k == 0 else "none" for i in range(n_blocks)]
    if mode in ("none", "full", "selective"):
        return [mode] * n_blocks
    raise ValueError(f"checkpointing mode {mode!r} has no fixed plan")


def describe_modes(modes: list[str]) -> str:
    """['selective', 'selective', 'full'] -> 'blocks 0-1 selective, 2 full'."""
    runs: list[list] = []
    for i, m in enumerate(modes):
        if runs and runs[-1][2] == m:
            runs[-1][1] = i
        else:
            runs.append([i, i, m])
    return "blocks " + ", ".join(f"{a}-{b} {m}" if a != b else f"{a} {m}" for a, b, m in runs)


def budgets(pcfg: ParallelConfig) -> list[float]:
    """parallel.memory_budget_gib as a list (one value: a list of one)."""
    b = pcfg.memory_budget_gib
    return [float(x) for x in b] if isinstance(b, list) else [float(b)]


def rank_budget_gib(pcfg: ParallelConfig, rank: int, world_size: int, local_world_size: int) -> float:
    """This rank's parallel.memory_budget_gib: the one value, or its entry of a list given per rank or per node
    (ranks of node k share entry k)."""
    b = budgets(pcfg)
    if len(b) == 1:
        return b[0]
    return per_rank("parallel.memory_budget_gib", b, world_size, local_world_size,
                    "one budget, one per node or one per rank")[rank]


def per_rank(key: str, values: list, world_size: int, local_world_size: int, give: str) -> list:
    """A list given one entry per rank, or one per node (ranks of node k share entry k), as one per rank; any other
    length is one line naming `key`, ending 'give <give>'."""
    if len(values) == world_size:
        return list(values)
    if local_world_size > 0 and len(values) * local_world_size == world_size:
        return [values[r // local_world_size] for r in range(world_size)]
    raise ConfigError(f"{key}: {len(values)} entries, but the job has {world_size} ranks on "
                      f"{world_size // max(1, local_world_size)} node(s); give {give}")


def check_device_support(pcfg: ParallelConfig, device_type: str) -> None:
    """Fail before any work is done when the options cannot run on this device."""
    if pcfg.cpu_offload and device_type != "cuda":
        raise ConfigError(
            "parallel.cpu_offload: true needs CUDA GPUs (FSDP2 offload pins host memory for GPU copies); "
            "this run is on CPU, so set parallel.cpu_offload=false"
        )
    if pcfg.reduce_dtype == "bf16" and resolve_precision(pcfg.precision, device_type) == "fp32":
        raise ConfigError(f"parallel.reduce_dtype: bf16 needs bf16 compute, but precision {pcfg.precision} is fp32 "
                          f"on {device_type}; set parallel.reduce_dtype=fp32 or parallel.precision=bf16-mixed")
    if pcfg.activation_checkpointing == "auto" and device_type != "cuda" and min(budgets(pcfg)) <= 0:
        raise ConfigError("parallel.memory_budget_gib: activation_checkpointing=auto on CPU needs a budget; "
                          "set parallel.memory_budget_gib (GiB) or choose another activation_checkpointing")


@dataclass(frozen=True)
class RunFacts:
    """The cluster a config runs on, and what the config resolves to there."""
    world_size: int
    gpus_per_node: int
    device_type: str  # cuda | cpu
    precision: str  # resolved: bf16-mixed | bf16-pure | fp32
    shard_group: int  # ranks a parameter is sharded over: a shard group under hybrid sharding, else all ranks
    gpu_memory: int  # bytes per GPU (0: unknown)
    cpu_memory: int | None = None  # host bytes per node (None: unknown)


def resolve_facts(cfg: Config, world_size: int, gpus_per_node: int, device_type: str, gpu_memory: int = 0,
                  cpu_memory: int | None = None) -> RunFacts:
    p = cfg.parallel
    return RunFacts(world_size=world_size, gpus_per_node=gpus_per_node, device_type=device_type,
                    precision=resolve_precision(p.precision, device_type),
                    shard_group=(p.shard_group_size or gpus_per_node) if p.sharding == "hybrid" else world_size,
                    gpu_memory=gpu_memory, cpu_memory=cpu_memory)
