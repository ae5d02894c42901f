"""Run outputs on rank 0: metrics.jsonl, TensorBoard scalars, console progress; MFU arithmetic.

Messages go through fsdptrain.core.log; while the progress bar is open it is log's writer, so they print above it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch

from ..core import log
from .sinks import Sinks, TensorBoardSink

# Dense bf16 peak TFLOP/s per device, by name fragment (first match wins: the PCIe and NVL parts of a family
# before its SXM part, whose name, e.g. "NVIDIA H100 80GB HBM3", has no suffix).
PEAK_TFLOPS = [("H200 NVL", 835.0), ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),
               ("H800 PCIe", 756.0), ("H800", 989.0), ("A100", 312.0), ("A800", 312.0),
               ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0), ("V100", 125.0)]


def peak_for_name(name: str) -> Optional[float]:
    """The dense bf16 peak of a CUDA device by its name (torch.cuda.get_device_name); None when unknown."""
    return next((v for k, v in PEAK_TFLOPS if k in name), None)


def peak_tflops(device: torch.device, configured: Optional[float]) -> Optional[float]:
    if configured:
        return configured
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


class RunLogger:
    """Writes metrics on the main rank only; other ranks get a no-op object."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, progress: str, total_steps: int,
                 start_step: int = 0, sinks: Optional[Callable[[], Sinks]] = None):
        """sinks: opens the metric sinks (logging.report_to); None: TensorBoard when `tensorboard`."""
        self.enabled = enabled
        self.last_eval: Optional[float] = None  # the latest eval loss, shown on the progress line
        self.total = total_steps
        self.start_step = start_step
        self.start = time.perf_counter()
        self.jsonl = None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        self.jsonl = open(out_dir / "metrics.jsonl", "a", buffering=1)
        if sinks is not None:
            self.tb = sinks()  # TensorBoard, W&B, MLflow behind one add_scalar
        elif tensorboard:
            self.tb = TensorBoardSink(out_dir)
        if progress == "auto":
            # FSDPTRAIN_TTY: launched by launch/torchrun.sh from a terminal, which shows the log file it writes to
            progress = "bar" if sys.stderr.isatty() or os.environ.get("FSDPTRAIN_TTY") == "1" else "lines"
        self.progress = progress
        if progress == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
            log.set_writer(self.bar.write)

    def log(self, step: int, metrics: dict) -> None:
        """`step` is 1-based (optimizer steps done)."""
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        record = {"step": step, **metrics, "elapsed_s": round(elapsed, 3)}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k.replace("eval_", "eval/", 1) if k.startswith("eval_") else k, v, step)
        if "loss" not in metrics:  # an evaluation after a skipped step: no training numbers to show
            return
        eta = elapsed / max(1, step - self.start_step) * (self.total - step)
        if self.bar is not None:
            self.bar.n = step
            extra = {} if self.last_eval is None else {"eval_loss": f"{self.last_eval:.4f}"}
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                 tok_s=f"{metrics['tokens_per_s_per_device']:.0f}", **extra)
        elif self.progress == "lines":
            ev = "" if self.last_eval is None else f" eval_loss {self.last_eval:.4f}"
            log.info(f"step {step}/{self.total} loss {metrics['loss']:.4f}{ev} lr {metrics['lr']:.2e} "
                     f"grad_norm {metrics['grad_norm']:.3f} tok/s/dev {metrics['tokens_per_s_per_device']:.0f} "
                     f"eta {eta:.0f}s")

    def eval_line(self, step: int, metrics: dict, units: str = "tokens") -> None:
        """An evaluation after optimizer step `step`: one line now, and its loss on the following step lines.
        A pair objective's metrics have no eval_ppl (its loss is no token NLL): the line shows the reward
        accuracy instead, and `units` (pairs) what eval_tokens counts."""
        if not self.enabled:
            return
        self.last_eval = metrics["eval_loss"]
        if self.progress != "none":
            shown = [f"{name} {metrics['eval_' + name]:.3f}" for name in ("ppl", "rewards/accuracies")
                     if "eval_" + name in metrics]
            log.info(" ".join([f"eval step {step}: loss {metrics['eval_loss']:.4f}", *shown]) +
                     f" ({metrics['eval_tokens']} {units}, {metrics['eval_time_s']:.1f}s)")

    def close(self) -> None:
        if self.bar is not None:
            log.set_writer(None)
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
