"""Command line: `fsdptrain train | config | data | eval | export | plot | estimate | mem report | mem diff` (click).

Exit statuses: 0 done; 2 a user mistake (`UserError`: one line `fsdptrain: error: ...`, no traceback); 1 anything
else (an internal error, out of memory, a distributed failure): two short lines on stderr, and the full
traceback in a file (`<output_dir>/crash-rank<R>-<time>.txt` once the run's output_dir is known, else a
temporary file).
"""

from __future__ import annotations

import functools
import os
import platform
import re
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

import click

from .core import log
from .core.errors import EXIT_STOPPED, ConfigError, RunStopped, UserError

# The run's output_dir once a command has loaded its config: where the traceback of a crash goes.
crash_dir: Optional[str] = None


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _rank_prefix() -> str:
    return f"[rank {_rank()}] " if "RANK" in os.environ else ""


def user_error(msg: str, print_rank: int = 0) -> None:
    """`fsdptrain: error: msg` from rank `print_rank` (0, or the lowest survivor when a rank died), and from
    the first process of every other node (so each node's log shows why it stopped)."""
    if (_rank() == print_rank or os.environ.get("LOCAL_RANK") == "0"
            or os.environ.get("FSDPTRAIN_ALL_RANKS_ERRORS")):
        log.error(f"{_rank_prefix()}{msg}")


def _first_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    return lines[0] if lines else "(no message)"


def _versions() -> str:
    from importlib import metadata

    found = []
    for name in ("fsdptrain", "torch", "transformers"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found + [f"python {platform.python_version()}", platform.platform()])


def write_crash_report(exc: BaseException) -> Optional[Path]:
    """The full traceback (with the command and versions) in a file; None if no file could be written."""
    argv = ["fsdptrain", *sys.argv[1:]] if sys.argv and sys.argv[0].endswith(("__main__.py", "fsdptrain")) \
        else sys.argv
    text = (f"fsdptrain crash report\ncommand: {shlex.join(argv)}\n"
            f"rank: {os.environ.get('RANK', '-')} of {os.environ.get('WORLD_SIZE', '-')}\n"
            f"time: {time.strftime('%Y-%m-%d %H:%M:%S %z')}\nversions: {_versions()}\n\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    if crash_dir and Path(crash_dir).is_dir():
        path = Path(crash_dir) / f"crash-rank{_rank()}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
        try:
            with open(path, "x") as f:  # never overwrite an earlier report
                f.write(text)
            return path
        except OSError:
            pass  # not writable, or a report of the same second: a temporary file instead
    try:
        fd, name = tempfile.mkstemp(prefix="fsdptrain-crash-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return Path(name)
    except OSError:
        return None


def _kind(exc: BaseException) -> tuple[str, str]:
    """(label, what to do) for an unexpected exception."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return ("out of memory", "lower train.micro_batch_size or data.max_length, or set "
                                 "parallel.activation_checkpointing (fsdptrain estimate CONFIG shows what fits)")
    dist_error = getattr(getattr(torch, "distributed", None), "DistError", None) if torch is not None else None
    if dist_error is not None and isinstance(exc, dist_error):
        return ("distributed failure", "another rank or node may have failed first: check its log (and the "
                                       "network between the nodes)")
    return "internal error", "please report it with the command you ran"


def report_crash(exc: BaseException) -> None:
    """Two short lines on stderr for an exception that is not a UserError; the traceback goes to a file."""
    sys.stdout.flush()
    label, advice = _kind(exc)
    path = write_crash_report(exc)
    print(f"fsdptrain: {label}: {_rank_prefix()}{type(exc).__name__}: {_first_line(exc)}", file=sys.stderr)
    if path is None:  # nowhere to write it: the traceback must not be lost
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        print(f"fsdptrain: the traceback could not be written to a file; {advice}", file=sys.stderr)
    else:
        print(f"fsdptrain: the full traceback is in {path}; {advice}", file=sys.stderr)
    sys.stderr.flush()


def friendly_errors(fn):
    """UserError -> one line `fsdptrain: error: ...` and exit status 2; any other exception -> two lines and
    the traceback in a file (report_crash), exit status 1. click's own exits and Ctrl-C pass through."""

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
            user_error(str(e), getattr(e, "print_rank", 0))
            if "fsdptrain.dist.distributed" in sys.modules:  # a process group may be up (never import torch for this)
                from .dist.distributed import tell_peers

                tell_peers(str(e))  # the other ranks stop now, not at their next collective's timeout
            sys.exit(2)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as e:  # noqa: BLE001 (the last resort: no bare traceback on the user's screen)
            report_crash(e)
            sys.exit(1)

    return wrapper


class FileFirst(click.Command):
    """A command whose config file is its first argument: `--config FILE` (a LLaMA-Factory / HF Trainer habit)
    gets a one-line hint instead of click's usage error."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        from .config.schema import refuse_config_flag

        try:
            refuse_config_flag(args, f"fsdptrain {self.name}")
        except UserError as e:
            user_error(str(e))
            ctx.exit(2)
        return super().parse_args(ctx, args)


def looks_like_override(arg: str) -> bool:
    """`key.path=value`, not a file name (a YAML file may hold '=' in its name)."""
    key, eq, _ = arg.partition("=")
    return bool(eq) and not arg.endswith((".yaml", ".yml")) and re.fullmatch(r"[A-Za-z_][\w.-]*", key) is not None


def config_first(command: str, config: Optional[str], overrides: tuple[str, ...], default: Optional[str],
                 usage: str = "") -> tuple[Optional[str], tuple[str, ...]]:
    """(CONFIG, overrides) of a command whose CONFIG comes first. A first argument of the form key=value is an
    override of `default` (None: the built-in demo config); a config file after it, or a command that has no
    default (`default` "", with `usage` saying why), gets a one-line hint that CONFIG comes first."""
    if config is None or not looks_like_override(config):
        return config, overrides
    files = [a for a in overrides if not looks_like_override(a)]
    if files:
        raise ConfigError(f"{files[0]}: CONFIG comes first, then the key=value overrides: fsdptrain {command} "
                          f"{files[0]} {config} ...")
    if default == "":
        raise ConfigError(f"{config}: this is a key=value override, and CONFIG comes first{usage}: fsdptrain "
                          f"{command} CONFIG {config} ...")
    return default, (config, *overrides)


# Where a run directory keeps its resolved config (run/rundir.py's RUN_OUTPUTS) and its checkpoints
# (run/checkpoint.py's SUBDIR); named here, not imported, because those modules import torch.
RUN_CONFIG, CHECKPOINTS = "config.yaml", "checkpoints"


def run_config_of(source: str) -> Optional[str]:
    """The config.yaml of the run that --checkpoint belongs to: a run directory, its checkpoints/ folder or a
    checkpoint in it. None for anything else (a Hugging Face folder, a checkpoint copied elsewhere)."""
    p = Path(source)
    for run_dir, holds in ((p, p / CHECKPOINTS), (p.parent, p), (p.parent.parent, p.parent)):
        if holds.name == CHECKPOINTS and holds.is_dir() and (run_dir / RUN_CONFIG).is_file():
            return str(run_dir / RUN_CONFIG)
    return None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """fsdptrain: fine-tune and pretrain Hugging Face causal LMs with PyTorch FSDP2."""


@main.command(cls=FileFirst, context_settings={"ignore_unknown_options": False})
@click.argument("config", required=False)
@click.argument("overrides", nargs=-1)
@friendly_errors
def train(config: str | None, overrides: tuple[str, ...]) -> None:
    """Train a model: CONFIG is a YAML file (omit it for the built-in demo); OVERRIDES are key.path=value."""
    global crash_dir
    from .config.schema import load_config

    config, overrides = config_first("train", config, overrides, None)
    cfg = load_config(config, overrides)  # before importing torch: a config mistake is reported at once
    crash_dir = cfg.output_dir
    from .trainer import train as run

    run(cfg)


@main.command("config", cls=FileFirst)
@click.argument("config", required=False)
@click.argument("overrides", nargs=-1)
@click.option("--dump", is_flag=True, help="Print the effective config (defaults filled in) with each key's doc.")
@click.option("--reference", is_flag=True, help="Print every key, its default and doc as a Markdown table.")
@click.option("--from-llamafactory", "from_lf", is_flag=True,
              help="CONFIG is a LLaMA-Factory training YAML: print its translation as a fsdptrain YAML.")
@friendly_errors
def config_cmd(config: str | None, overrides: tuple[str, ...], dump: bool, reference: bool, from_lf: bool) -> None:
    """Validate a config; with --dump print the effective config."""
    from .config.schema import dump_yaml, load_config, reference_rows

    if from_lf:
        from .config.llamafactory import lf_yaml

        text = lf_yaml(config)
        load_config(config, quiet=True)  # the translation must load and validate as a fsdptrain config
        click.echo(text, nl=False)
        return

    if reference:
        click.echo("| key | default | meaning |\n| --- | --- | --- |")
        for key, default, doc in reference_rows():
            click.echo(f"| `{key}` | `{default}` | {doc} |")
        return

    config, overrides = config_first("config", config, overrides, None)
    cfg = load_config(config, overrides)
    if dump:
        click.echo(dump_yaml(cfg), nl=False)
    else:
        click.echo(f"{config or 'default config'}: ok")


@main.command("data", cls=FileFirst)
@click.argument("config", required=False)
@click.argument("overrides", nargs=-1)
@click.option("--show", default=3, show_default=True, help="Print this many examples with their trained spans marked.")
@click.option("--out", default=None, help="Write every example as a JSON line (input_ids, labels, source, record).")
@friendly_errors
def data_cmd(config: str | None, overrides: tuple[str, ...], show: int, out: str | None) -> None:
    """Run only the data pipeline of CONFIG (no model, no GPU): counts per data set and marked examples."""
    from .config.schema import load_config
    from .data.preview import preview

    config, overrides = config_first("data", config, overrides, None)
    cfg = load_config(config, overrides)
    preview(cfg, show, out, color=sys.stdout.isatty(), echo=click.echo)


@main.command("eval", cls=FileFirst)
@click.argument("config", required=False)
@click.argument("overrides", nargs=-1)
@click.option("--checkpoint", "source", required=True,
              help="A checkpoint folder, a run directory (its newest checkpoint) or a Hugging Face model folder.")
@click.option("--out", "out_file", default=None,
              help="JSON result file; default: eval-<checkpoint name>.json in the current folder.")
@friendly_errors
def eval_cmd(config: str | None, overrides: tuple[str, ...], source: str, out_file: str | None) -> None:
    """Eval loss and perplexity (sft), or loss and reward accuracy per held-out pair (dpo, rm), of --checkpoint on
    CONFIG's eval data (any number of ranks). CONFIG defaults to the run's config.yaml when --checkpoint is a run
    directory or a checkpoint in one."""
    from .config.schema import load_config

    found = run_config_of(source) if config is None or looks_like_override(config) else None
    if config is None:
        if found is None:
            raise ConfigError(f"--checkpoint: {source} is not a run directory or a checkpoint in one, so there is "
                              "no run config.yaml to evaluate with; give CONFIG first (the eval data and model "
                              f"settings): fsdptrain eval CONFIG [key=value ...] --checkpoint {source}")
        config = found
    else:
        config, overrides = config_first("eval", config, overrides, found or "",
                                         f" (--checkpoint {source} is not a run directory with a config.yaml)")
    cfg = load_config(config, overrides)  # before importing torch: a config mistake is reported at once
    from .evalrun import eval_checkpoint

    eval_checkpoint(cfg, source, out_file)


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
@click.option("--best", is_flag=True, help="CHECKPOINT is a run directory: export its best checkpoint "
                                           "(checkpoint.keep_best) instead of the newest.")
@click.option("--merge", is_flag=True, help="LoRA: write a full model with the adapters merged into the base weights "
                                            "(default: a PEFT adapter folder).")
@click.option("--base", default=None, help="LoRA / freeze: the base model folder, when it moved since training "
                                           "(default: the model.path the run trained on).")
@friendly_errors
def export_cmd(checkpoint: str, out_dir: str, overwrite: bool, dtype: str, max_shard_size: str, best: bool,
               merge: bool, base: str | None) -> None:
    """Write a Hugging Face model folder from CHECKPOINT (a checkpoint folder, or a run directory: its newest);
    a LoRA run gives a PEFT adapter folder (--merge: a full model)."""
    from .config.schema import parse_size
    from .run.export import export_checkpoint

    if best:
        from .run.best import best_checkpoint

        checkpoint = str(best_checkpoint(checkpoint))

    out, replaced = export_checkpoint(checkpoint, out_dir, dtype, parse_size(max_shard_size, "--max-shard-size"),
                                      overwrite=overwrite, merge=merge, base=base)
    click.echo(f"exported {checkpoint} to {out}" + (" (replaced the earlier export there)" if replaced else ""))


@main.command("plot")
@click.argument("run_dirs", nargs=-1, required=True)
@click.option("--out", "out_file", default=None, help="PNG to write; default: RUN_DIR/plot.png of the first run.")
@friendly_errors
def plot_cmd(run_dirs: tuple[str, ...], out_file: str | None) -> None:
    """Train loss (raw and smoothed), eval loss, learning rate, tokens/s and per-rank peak memory of RUN_DIRs."""
    from .run.plot import plot

    click.echo(f"plot: {plot(list(run_dirs), out_file)}")


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
    click.echo(report.render_time(run_dir), nl=False)  # several ranks: who waited for whom
    click.echo(report.render_breakdowns(run_dir), nl=False)  # memory.breakdown_steps
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


def gpu_speeds(text: str, nnodes: int, gpus_per_node: int) -> list[float]:
    """--gpu-speed: relative speeds per rank (one value, one per node or one per GPU), all above zero."""
    from .memory import estimate

    try:
        values = [float(x) for x in estimate.rank_sizes(text, nnodes, gpus_per_node, "--gpu-speed")]
    except ValueError:
        raise UserError(f"--gpu-speed: {text!r}: give relative speeds as numbers, e.g. 4x1,4x3") from None
    if min(values) <= 0:
        raise UserError(f"--gpu-speed: {text!r}: every speed must be above zero")
    return values


@main.command("estimate", cls=FileFirst)
@click.argument("config")
@click.argument("overrides", nargs=-1)
@click.option("--nnodes", default=1, show_default=True, help="Nodes.")
@click.option("--gpus-per-node", default=8, show_default=True, help="GPUs per node.")
@click.option("--gpu-memory", default="80GiB", show_default=True, help="Memory per GPU, e.g. 80GiB, 141GB; mixed "
              "GPUs: one per node or one per GPU, e.g. 4x24GiB,4x80GiB.")
@click.option("--gpu-speed", default=None, help="Relative GPU speeds (one per node or per GPU, e.g. 4x1,4x3): the "
              "share of each step data.balance: speed would give each rank.")
@click.option("--cpu-memory", default=None, help="Host memory per node (checked when offloading), e.g. 1TiB.")
@click.option("--trace", is_flag=True, help="Also trace the real training step on fake tensors at this world "
              "size and compare, category by category (docs/memory.md).")
@click.option("--forecast", is_flag=True, help="Trace (implies --trace) each rank's largest micro-batch of the "
              "first epoch from the configured data, and forecast every rank's peak and the imbalance.")
@friendly_errors
def estimate_cmd(config: str, overrides: tuple[str, ...], nnodes: int, gpus_per_node: int, gpu_memory: str,
                 gpu_speed: str | None, cpu_memory: str | None, trace: bool, forecast: bool) -> None:
    """Per-rank memory of CONFIG from the model config alone (no weights, no GPU), the verdict and what to change."""
    from .config.schema import load_config, parse_size
    from .memory import allowance, estimate

    config, overrides = config_first("estimate", config, overrides, "", " (the model and settings to estimate)")
    cfg = load_config(config, overrides)
    sizes = [parse_size(x, "--gpu-memory") for x in estimate.rank_sizes(gpu_memory, nnodes, gpus_per_node)]
    speeds = gpu_speeds(gpu_speed, nnodes, gpus_per_node) if gpu_speed else None
    cpu = parse_size(cpu_memory, "--cpu-memory") if cpu_memory else None
    by_size = {size: estimate.estimate(cfg, nnodes, gpus_per_node, size, cpu) for size in sorted(set(sizes))}
    est = by_size[min(sizes)]  # the whole breakdown for the smallest GPU
    trace = trace or forecast  # the forecast is traced
    if trace:  # what cannot be traced is refused before anything is printed
        from .memory import trace as traced

        traced.check_traceable(cfg, est)
    click.echo(estimate.render(est), nl=False)
    click.echo(allowance.estimate_line(est.peak, est.settings.facts.gpu_memory), nl=False)
    if len(by_size) > 1:
        ranks = {size: [r for r, x in enumerate(sizes) if x == size] for size in by_size}
        click.echo(estimate.render_mixed(by_size, ranks), nl=False)
    if speeds:
        click.echo(estimate.render_speeds(speeds), nl=False)
    if trace:
        facts, say = est.settings.facts, (lambda m: click.echo(m, err=True))
        plans = traced.plan_ranks(cfg, facts.world_size, facts.gpus_per_node, say) if forecast else None
        rep = traced.run_trace(cfg, nnodes, gpus_per_node, facts.gpu_memory, facts.cpu_memory,
                               traced.forecast_shapes(cfg, plans) if plans else None, say)
        click.echo(traced.render(rep), nl=False)
        click.echo(allowance.trace_line({traced.describe_ranks(rt.ranks): rt.trace.peak.total for rt in rep.traces},
                                        facts.gpu_memory), nl=False)
        if plans:
            click.echo(traced.render_forecast(rep, plans), nl=False)


if __name__ == "__main__":
    main()
