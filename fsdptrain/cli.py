"""Command line: `fsdptrain train | config | export | estimate | mem report | mem diff` (click).

User mistakes become one line and exit 2.
"""

from __future__ import annotations

import functools
import os
import sys

import click

from . import log
from .errors import RunStopped, UserError
from .stopping import EXIT_STOPPED


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def friendly_errors(fn):
    """Turn UserError into `fsdptrain: error: ...` on stderr (rank 0 only) and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RunStopped as e:  # a signal or the time limit: the checkpoint is saved, the same command continues
            log.info(f"fsdptrain: {e}")
            sys.exit(EXIT_STOPPED)
        except KeyboardInterrupt:  # a second Ctrl-C during training, or one before it started
            log.error("interrupted: stopped at once without saving; rerun the same command to continue from the "
                      "last checkpoint")
            sys.exit(130)
        except UserError as e:
            # rank 0, and the first process of every other node (so each node's log shows why it stopped)
            if (_rank() == getattr(e, "print_rank", 0) or os.environ.get("LOCAL_RANK") == "0"
                    or os.environ.get("FSDPTRAIN_ALL_RANKS_ERRORS")):
                prefix = f"[rank {_rank()}] " if "RANK" in os.environ else ""
                log.error(f"{prefix}{e}")
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """fsdptrain: fine-tune and pretrain Hugging Face causal LMs with PyTorch FSDP2."""


@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("config", required=False)
@click.argument("overrides", nargs=-1)
@friendly_errors
def train(config: str | None, overrides: tuple[str, ...]) -> None:
    """Train a model: CONFIG is a YAML file (omit it for the built-in demo); OVERRIDES are key.path=value."""
    from .config import load_config
    from .trainer import train as run

    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides = (config, *overrides)
        config = None
    cfg = load_config(config, overrides)
    run(cfg)


@main.command("config")
@click.argument("config", required=False)
@click.argument("overrides", nargs=-1)
@click.option("--dump", is_flag=True, help="Print the effective config (defaults filled in) with each key's doc.")
@click.option("--reference", is_flag=True, help="Print every key, its default and doc as a Markdown table.")
@friendly_errors
def config_cmd(config: str | None, overrides: tuple[str, ...], dump: bool, reference: bool) -> None:
    """Validate a config; with --dump print the effective config."""
    from .config import dump_yaml, load_config, reference_rows

    if reference:
        click.echo("| key | default | meaning |\n| --- | --- | --- |")
        for key, default, doc in reference_rows():
            click.echo(f"| `{key}` | `{default}` | {doc} |")
        return

    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides = (config, *overrides)
        config = None
    cfg = load_config(config, overrides)
    if dump:
        click.echo(dump_yaml(cfg), nl=False)
    else:
        click.echo(f"{config or 'default config'}: ok")


@main.command("export")
@click.argument("checkpoint")
@click.option("--out", "out_dir", required=True,
              help="Folder to write the Hugging Face model to: a new or empty folder (see --overwrite).")
@click.option("--overwrite", is_flag=True,
              help="Replace an earlier fsdptrain export in --out (recognised by its fsdptrain_export.json); "
                   "anything else is never replaced.")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="Weight dtype; auto: bf16 if the run trained in bf16, else fp32.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest safetensors file (e.g. 5GB, 500MB).")
@friendly_errors
def export_cmd(checkpoint: str, out_dir: str, overwrite: bool, dtype: str, max_shard_size: str) -> None:
    """Write a Hugging Face model folder from CHECKPOINT (a checkpoint folder, or a run directory: its newest)."""
    from .config import parse_size
    from .export import export_checkpoint

    out, replaced = export_checkpoint(checkpoint, out_dir, dtype, parse_size(max_shard_size, "--max-shard-size"),
                                      overwrite=overwrite)
    click.echo(f"exported {checkpoint} to {out}" + (" (replaced the earlier export there)" if replaced else ""))


@main.group("mem")
def mem() -> None:
    """Memory tools: per-rank report of a run, snapshot diff."""


@mem.command("report")
@click.argument("run_dir")
@click.option("--plot", "plot_file", default=None,
              help="Also draw every rank's memory over steps and phases into this PNG.")
@friendly_errors
def mem_report(run_dir: str, plot_file: str | None) -> None:
    """Per-rank peak memory table and imbalance summary of RUN_DIR (from memory/rank*.jsonl)."""
    from .memory import report

    runs = report.read_run(run_dir)
    click.echo(report.render(run_dir, runs), nl=False)
    if plot_file:
        report.plot(runs, plot_file)
        click.echo(f"plot: {plot_file}")


@mem.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--top", default=20, show_default=True, help="Rows to show.")
@friendly_errors
def mem_diff(a: str, b: str, top: int) -> None:
    """Live memory at the peak of snapshots A and B by allocation site, largest difference first."""
    from .memory import diff, snapshot

    rows, pa, pb = diff.diff(snapshot.load(a), snapshot.load(b))
    click.echo(diff.render(rows, pa, pb, a, b, top), nl=False)


@main.command("estimate")
@click.argument("config")
@click.argument("overrides", nargs=-1)
@click.option("--nnodes", default=1, show_default=True, help="Nodes.")
@click.option("--gpus-per-node", default=8, show_default=True, help="GPUs per node.")
@click.option("--gpu-memory", default="80GiB", show_default=True, help="Memory per GPU, e.g. 80GiB, 141GB.")
@click.option("--cpu-memory", default=None, help="Host memory per node (checked when offloading), e.g. 1TiB.")
@friendly_errors
def estimate_cmd(config: str, overrides: tuple[str, ...], nnodes: int, gpus_per_node: int, gpu_memory: str,
                 cpu_memory: str | None) -> None:
    """Per-rank memory of CONFIG from the model config alone (no weights, no GPU), the verdict and what to change."""
    from .config import load_config, parse_size
    from .memory import estimate

    cfg = load_config(config, overrides)
    est = estimate.estimate(cfg, nnodes, gpus_per_node, parse_size(gpu_memory, "--gpu-memory"),
                            parse_size(cpu_memory, "--cpu-memory") if cpu_memory else None)
    click.echo(estimate.render(est), nl=False)


if __name__ == "__main__":
    main()
