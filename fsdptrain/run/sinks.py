"""Metric sinks on rank 0: TensorBoard, Weights & Biases, MLflow (logging.report_to).

Each sink takes scalars as `add_scalar(tag, value, step)` (TensorBoard's call, so
the memory tracker writes its per-rank scalars through the same object). W&B and
MLflow are optional extras, imported only when listed: a missing package is one
line naming what to pip install.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from ..config.schema import Config, to_dict
from ..core.errors import ConfigError, UserError

INSTALL = {"wandb": "pip install wandb  (or pip install 'fsdptrain[wandb]')",
           "mlflow": "pip install mlflow-skinny  (or pip install 'fsdptrain[mlflow]')"}


def not_installed(name: str, sink: str) -> ConfigError:
    return ConfigError(f"logging.report_to: {sink} is listed but the {name} package is not installed; "
                       f"{INSTALL[sink]}, or remove {sink} from logging.report_to")


def optional_import(name: str, sink: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise not_installed(name, sink) from None


def active(report_to: list[str], tensorboard: bool) -> list[str]:
    """The sinks to open: report_to, less tensorboard when the deprecated logging.tensorboard is false. Every
    rank checks the optional packages are there (without importing them), so all stop together if not."""
    names = [s for s in dict.fromkeys(report_to) if s != "tensorboard" or tensorboard]
    for sink, module in (("wandb", "wandb"), ("mlflow", "mlflow")):
        if sink in names and importlib.util.find_spec(module) is None:
            raise not_installed(module, sink)
    return names


class TensorBoardSink:
    def __init__(self, out_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out_dir / "tb"))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run whose files go to output_dir/wandb (WANDB_MODE=offline: nothing leaves the machine)."""

    def __init__(self, out_dir: Path, name: str, project: str, config: dict):
        wandb = optional_import("wandb", "wandb")
        self.wandb = wandb
        self.run = wandb.init(project=project, name=name, dir=str(out_dir), config=config,
                              settings=wandb.Settings(console="off", x_disable_stats=True))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.run.log({tag: value}, step=step)

    def close(self) -> None:
        self.run.finish()
        # finish() only asks wandb's service to close the run: its run file is written when the service closes
        # the stream, after finish() returns (a small offline run file is held in one buffer until then).
        # teardown() waits for the service to exit, so the run's files are complete when training returns.
        self.wandb.teardown()


class MlflowSink:
    def __init__(self, name: str, tracking_uri: Optional[str], experiment: str, params: dict):
        mlflow = optional_import("mlflow", "mlflow")
        self.mlflow = mlflow
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(experiment)
        self.run = mlflow.start_run(run_name=name)
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.mlflow.log_metric(tag, float(value), step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def flat(d: dict, prefix: str = "") -> dict:
    """A nested config as dotted keys (MLflow params, W&B config)."""
    out: dict = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "hf_config":
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Sinks:
    """Every configured sink behind one add_scalar; opened on rank 0 only."""

    def __init__(self, names: list[str], out_dir: Path, run_name: str, options: dict, config: dict):
        self.sinks: list[Any] = []
        name = ""
        try:
            for name in names:
                if name == "tensorboard":
                    self.sinks.append(TensorBoardSink(out_dir))
                elif name == "wandb":
                    self.sinks.append(WandbSink(out_dir, run_name, options["wandb_project"], flat(config)))
                elif name == "mlflow":
                    self.sinks.append(MlflowSink(run_name, options["mlflow_tracking_uri"],
                                                 options["mlflow_experiment"], flat(config)))
        except UserError:
            self.close()
            raise
        except Exception as e:  # noqa: BLE001  (the sink's own refusal, e.g. a tracking store it will not use)
            self.close()
            lines = [x for x in str(e).strip().splitlines() if x.strip()]
            raise UserError(f"logging.report_to: {name} could not start ({type(e).__name__}: "
                            f"{lines[0] if lines else ''}); fix its settings or remove it from "
                            "logging.report_to") from None

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        for s in self.sinks:
            s.add_scalar(tag, value, step)

    def close(self) -> None:
        for s in self.sinks:
            s.close()
        self.sinks = []


def open_sinks(cfg: Config, out_dir: Path) -> Callable[[], Sinks]:
    """What RunLogger calls on rank 0 to open the configured sinks (checked on every rank first)."""
    lc = cfg.logging
    names = active(lc.report_to, lc.tensorboard)
    options = {"wandb_project": lc.wandb_project, "mlflow_tracking_uri": lc.mlflow_tracking_uri,
               "mlflow_experiment": lc.mlflow_experiment}
    return lambda: Sinks(names, out_dir, lc.run_name or Path(out_dir).resolve().name, options, to_dict(cfg))
