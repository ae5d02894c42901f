"""Per-rank memory tracker: phase records, per-block hooks, cross-rank peaks, snapshots, OOM stop.

The trainer calls, per optimizer step: `step_start(step, batches)`, then
`phase("forward", i)` and `phase("backward", i)` per micro-batch, then
`phase("optimizer")`, and `gather(step, log)` on log steps; after an evaluation
`phase("eval")` (its peak; per-block records during it are labelled eval). Every call writes
one JSON line to output_dir/memory/rank{R}.jsonl with the SCHEMA fields of
stats.py (current, and peak since the previous record: the peak is reset at
each record) plus the step's tokens and the micro-batch's shape, so a line's
`*_peak` values belong to the phase it names.

`gather` is the only collective: one all_gather of a few numbers per rank
every log step. Rank 0 writes per-rank TensorBoard scalars, the imbalance
(max / median peak, rank of the max) and, past memory.imbalance_warn, a
console warning naming the rank, the phase and the likely cause.

Out of memory (`on_error`): the failing rank writes the post-mortem, then
distributed.PeerStop prints one `fsdptrain: error:` line naming the rank and
the files and stops every rank.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..config.schema import MemoryConfig
from ..core import log
from ..core.errors import PeerLost, TrainingError
from ..dist import distributed
from ..dist.distributed import DistInfo, PeerStop
from . import snapshot
from . import stats as memstats

PHASES = ["step_start", "forward", "backward", "optimizer", "recompute", "eval"]
# Numbers gathered per rank each log step (in this order).
GATHERED = ["allocated_peak", "reserved_peak", "inactive_split_peak", "num_alloc_retries", "num_ooms",
            "step", "phase", "module", "micro", "batch_tokens", "longest"]
from ..core.units import GIB  # noqa: E402


def likely_cause(rows: list[dict], r: int) -> str:
    """Why rank r's peak differs, from the gathered rows (one dict of GATHERED per rank)."""
    def med(key: str) -> float:
        return statistics.median(x[key] for x in rows)

    row = rows[r]
    if med("batch_tokens") > 0 and row["batch_tokens"] >= 1.2 * med("batch_tokens"):
        return (f"rank {r}'s micro-batch had {row['batch_tokens'] / med('batch_tokens'):.1f}x the median's tokens "
                f"({int(row['batch_tokens']):,} vs {int(med('batch_tokens')):,} padded tokens); "
                "sort or bucket examples by length, or lower data.max_length")
    if med("longest") > 0 and row["longest"] >= 1.2 * med("longest"):
        return (f"rank {r} had the longest sequence ({int(row['longest']):,} vs median "
                f"{int(med('longest')):,} tokens); lower data.max_length")
    if row["num_alloc_retries"] > med("num_alloc_retries"):
        return (f"allocator retries on rank {r} ({int(row['num_alloc_retries'])}; fragmentation "
                f"{row['inactive_split_peak'] / GIB:.2f} GiB); try PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    if r == 0:
        return ("same tokens as the other ranks: rank 0's extra work (logging, export, gathering) "
                "or another process on its device")
    return (f"same tokens as the other ranks: memory held outside the step on rank {r} "
            "(another process on its device, a leaked tensor)")


def phase_name(code: int, module: int, modules: list[str]) -> str:
    name = PHASES[int(code)] if 0 <= int(code) < len(PHASES) else "?"
    return f"{name}:{modules[int(module)]}" if 0 <= int(module) < len(modules) else name


class MemoryTracker:
    """One per run and rank: phase records, interval peaks for `gather`, snapshots and the OOM stop."""

    def __init__(self, mcfg: MemoryConfig, info: DistInfo, run_dir: str | Path, model: Optional[nn.Module] = None,
                 blocks: Optional[list[nn.Module]] = None):
        self.cfg = mcfg
        self.rank, self.world = info.rank, info.world_size
        self.device = info.device
        self.enabled = bool(mcfg.track_peak)
        self.dir = Path(run_dir) / "memory"
        self.step = 0
        self.where = "set-up"
        self.modules: list[str] = []
        self._hooks: list = []
        self._file = None
        self._batches: list[tuple[int, int]] = []  # (padded tokens, width) per micro-batch of this step
        self._micro: Optional[int] = None
        self._tokens = 0  # real (unpadded) tokens of this rank's step
        self.peak_bytes_max = 0  # highest peak allocated of any rank over all gathers so far
        self._recording = False
        self.evaluating = False  # set by the trainer around an evaluation: block records are `eval` ones
        self.listeners: list = []  # called as f(name, micro) at each phase end (memory.breakdown's tracked step)
        # the process's watch over its peers (distributed.init starts it for a launched group); a local, idle
        # one otherwise (one process, or a group made elsewhere)
        self.peers = distributed.peers() or PeerStop(self.rank, self.world)
        self.peers.before_exit = self._flush
        self.t0 = time.perf_counter()
        self._reset_interval()
        if self.enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.dir / f"rank{self.rank}.jsonl", "a", buffering=1)
            if mcfg.per_module and model is not None and blocks:
                self._install_hooks(model, blocks)
            memstats.reset_peak(self.device)
        if self.device.type != "cuda" and (mcfg.snapshot_steps or mcfg.record_history):
            log.info("memory: snapshot_steps / record_history need CUDA allocation history; ignored on "
                     f"{self.device.type} (per-phase records and the OOM post-mortem still work)")
        if self.device.type == "cuda" and mcfg.record_history:
            snapshot.start_recording(mcfg.snapshot_max_entries)
            self._recording = True

    # ------------------------------------------------------------------------- records

    def _reset_interval(self) -> None:
        self.interval = {k: 0.0 for k in GATHERED}
        self.interval["module"] = -1.0

    def step_start(self, step: int, batches: list[dict]) -> None:
        """`step` is the 1-based optimizer step about to run (records carry it, like metrics.jsonl)."""
        self.step = step
        self._batches = [(int(b["input_ids"].numel()), int(b["input_ids"].shape[1])) for b in batches]
        self._tokens = sum(int(b["n_tokens"]) if "n_tokens" in b else int(b["input_ids"].numel()) for b in batches)
        self._micro = None
        if self.device.type == "cuda" and self.step in self.cfg.snapshot_steps and not self._recording:
            snapshot.start_recording(self.cfg.snapshot_max_entries)
            self._recording = True
        self._record("step_start", None, "forward of micro-batch 0")
        self._micro = 0  # the micro-batch that per-block hooks attribute their records to

    def phase(self, name: str, micro: Optional[int] = None) -> None:
        for listener in self.listeners:
            listener(name, micro)
        n = len(self._batches)
        if name == "forward":
            nxt = f"backward of micro-batch {micro}"
        elif name == "backward":
            nxt = (f"forward of micro-batch {micro + 1}" if micro is not None and micro + 1 < n
                   else "gradient clipping / optimizer step")
        elif name == "eval":
            nxt = "evaluation" if self.evaluating else "between steps (logging)"
        else:
            nxt = "between steps (logging)"
        self._record(name, micro, nxt)
        if name == "backward" and micro is not None:
            self._micro = micro + 1
        if name == "optimizer" and self.step in self.cfg.snapshot_steps and self._recording:
            snapshot.dump(self.dir / f"snapshot_step{self.step}_rank{self.rank}.pickle")
            if not self.cfg.record_history and not any(s > self.step for s in self.cfg.snapshot_steps):
                snapshot.stop_recording()
                self._recording = False

    def _record(self, phase: str, micro: Optional[int], next_where: str, module: int = -1) -> None:
        if not self.enabled:
            self.where = next_where
            return
        s = memstats.sample(self.device)
        if micro is not None and micro < len(self._batches):
            batch_tokens, longest = self._batches[micro]
        else:
            batch_tokens = sum(t for t, _ in self._batches)
            longest = max((w for _, w in self._batches), default=0)
        label = phase if module < 0 else f"{phase}:{self.modules[module]}"
        rec = {"step": self.step, "phase": label, "micro": micro, "t": round(time.perf_counter() - self.t0, 6),
               **s, "tokens": self._tokens, "batch_tokens": batch_tokens, "longest": longest}
        self._file.write(json.dumps(rec) + "\n")
        if s["allocated_peak"] > self.interval["allocated_peak"]:  # the first record to reach the peak names it
            self.interval.update(allocated_peak=s["allocated_peak"], step=self.step, phase=PHASES.index(phase),
                                 module=module, micro=-1 if micro is None else micro,
                                 batch_tokens=batch_tokens, longest=longest)
        self.interval["reserved_peak"] = max(self.interval["reserved_peak"], s["reserved_peak"])
        self.interval["inactive_split_peak"] = max(self.interval["inactive_split_peak"], s["inactive_split_peak"])
        self.interval["num_alloc_retries"] = s["num_alloc_retries"]
        self.interval["num_ooms"] = s["num_ooms"]
        memstats.reset_peak(self.device)
        self.where = next_where

    # ------------------------------------------------------------------------- per-block hooks

    def _install_hooks(self, model: nn.Module, blocks: list[nn.Module]) -> None:
        names = {id(m): n for n, m in model.named_modules()}
        for i, m in enumerate(blocks):
            self.modules.append(names.get(id(m), f"block{i}"))
            self._hooks.append(m.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))
            self._hooks.append(m.register_forward_hook(self._post_hook(i), with_kwargs=True))

    def _pre_hook(self, i: int):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
                # fires when the gradient w.r.t. the block input is ready: the block's backward is done
                x.register_hook(lambda g: self._record("backward", self._micro, "backward", i))
        return hook

    def _post_hook(self, i: int):
        def hook(module, args, kwargs, output):
            in_backward = torch._C._current_graph_task_id() != -1
            phase = "eval" if self.evaluating else "recompute" if in_backward else "forward"
            self._record(phase, self._micro, "forward", i)
        return hook

    # ------------------------------------------------------------------------- across ranks

    def gather(self, step: int, tb: Any = None) -> dict:
        """One all_gather of this interval's peaks; rank 0 logs per-rank scalars (to `tb`, a TensorBoard
        writer) and the imbalance. Returns metrics."""
        if not self.enabled:
            return {}
        mine = torch.tensor([float(self.interval[k]) for k in GATHERED], dtype=torch.float64, device=self.device)
        out = [mine]
        if self.world > 1:
            out = [torch.empty_like(mine) for _ in range(self.world)]
            dist.all_gather(out, mine)
        rows = [dict(zip(GATHERED, t.tolist())) for t in out]
        self._reset_interval()
        peaks = [r["allocated_peak"] for r in rows]
        r_max = max(range(len(peaks)), key=peaks.__getitem__)
        self.peak_bytes_max = max(self.peak_bytes_max, int(peaks[r_max]))
        med = statistics.median(peaks)
        ratio = peaks[r_max] / med if med > 0 else 1.0
        if tb is not None:
            for r, row in enumerate(rows):
                tb.add_scalar(f"memory/rank{r}/peak_allocated_gib", row["allocated_peak"] / GIB, step)
                tb.add_scalar(f"memory/rank{r}/peak_reserved_gib", row["reserved_peak"] / GIB, step)
                tb.add_scalar(f"memory/rank{r}/alloc_retries", row["num_alloc_retries"], step)
        if self.world > 1 and ratio > self.cfg.imbalance_warn:
            row = rows[r_max]
            micro = f" micro-batch {int(row['micro'])}" if row["micro"] >= 0 else ""
            log.info(f"memory imbalance at step {step}: rank {r_max} peaked at {peaks[r_max] / GIB:.2f} GiB in "
                     f"{phase_name(row['phase'], row['module'], self.modules)}{micro} of step {int(row['step'])}, "
                     f"{ratio:.2f}x the median {med / GIB:.2f} GiB; likely cause: {likely_cause(rows, r_max)}")
        return {"peak_mem_gib_max": peaks[r_max] / GIB, "peak_mem_rank_of_max": r_max,
                "peak_reserved_gib_max": max(r["reserved_peak"] for r in rows) / GIB, "mem_imbalance": ratio}

    # ------------------------------------------------------------------------- failure handling

    def _flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def on_error(self, exc: BaseException, model: Optional[nn.Module] = None,
                 optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Called from the trainer's except clause. Returns only when the error is not ours to handle."""
        if self.peers.peer_failed():
            self.peers.exit(1)  # another rank ran out of memory and has already said so
        if _is_peer_loss(exc):
            dead = self.peers.dead_ranks()
            if dead is None:
                self.peers.store_gone()
            if dead:
                who = "; ".join(f"rank {r} on host {h} (pid {p})" for r, h, p in dead)
                alive = [r for r in range(self.world) if r not in {d[0] for d in dead}]
                raise PeerLost(f"{who} stopped without a word at step {self.step} (killed, or its node was "
                               "lost); the other ranks stop too. Rerun the same command to continue from the "
                               "last checkpoint", print_rank=min(alive)) from None
        if not (isinstance(exc, torch.OutOfMemoryError) and self.cfg.oom_postmortem):
            return
        self.peers.failing = True  # a peer's failure seen meanwhile must not cut this post-mortem short
        files = self.postmortem(exc, model, optimizer)
        msg = (f"rank {self.rank} ran out of memory at step {self.step} ({self.where}); "
               f"post-mortem: {', '.join(str(f) for f in files)}")
        if self.world <= 1:
            raise TrainingError(msg) from None
        self.peers.fail(msg)

    def postmortem(self, exc: BaseException, model: Optional[nn.Module],
                   optimizer: Optional[torch.optim.Optimizer]) -> list[Path]:
        """Write oom_rank{R}.txt (readable), oom_rank{R}_stats.json and, on CUDA, oom_rank{R}.pickle."""
        self.dir.mkdir(parents=True, exist_ok=True)
        base = self.dir / f"oom_rank{self.rank}"
        stats = memstats.sample(self.device)
        raw = torch.cuda.memory_stats(self.device) if self.device.type == "cuda" else {}
        ranges = snapshot.owner_ranges(model, optimizer)
        files = [base.with_suffix(".txt"), Path(f"{base}_stats.json")]
        if self.device.type == "cuda":
            snap = torch.cuda.memory._snapshot(self.device)
            blocks = snapshot.live_blocks(snap)
            files.append(base.with_suffix(".pickle"))
            snapshot.dump(files[-1])
        else:  # no allocator to ask: list the tensors we know (activations are not visible on CPU)
            blocks = [snapshot.Block(s, e - s, []) for s, e, _, _ in ranges]
        groups = snapshot.group(blocks, ranges)
        files[0].write_text(snapshot.postmortem_text(self.rank, self.step, self.where, str(exc), stats, groups))
        files[1].write_text(json.dumps({"rank": self.rank, "step": self.step, "where": self.where,
                                        "error": str(exc), "stats": stats, "memory_stats": raw,
                                        "owners": {o: g["bytes"] for o, g in groups.items()}}, indent=1))
        return files

    def close(self) -> None:
        self.peers.before_exit = lambda: None
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._recording:
            snapshot.stop_recording()
            self._recording = False
        if self._file is not None:
            self._file.close()
            self._file = None


def _is_peer_loss(exc: BaseException) -> bool:
    """A collective failed because a peer's connection closed (gloo) or NCCL reported a remote error."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited",
        "NCCL communicator was aborted"))
