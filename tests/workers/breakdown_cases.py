"""The launched side of test_breakdown.py: one 2-rank gloo group runs five trainings of the same config.

Usage (under torchrun): python -m tests.workers.breakdown_cases SPEC.json
SPEC: {"config": yaml, "root": dir, "step": S, "repeats": 3, "seq": width}
  plain/    : trained as configured (no memory.breakdown_steps)
  tracked/  : memory.breakdown_steps=[S, S+1, S+2] (writes memory/breakdown_step{N}_rank{R}.json for each)
  selective_plain/, selective_tracked/ : the same two with selective activation checkpointing and bf16-mixed
  measured/ : steps 1..S-1 by the trainer, then steps S..S+2 under memory.trace.measure_steps (the tracker function
              of `estimate --trace`), written to root/measured_rank{R}.json
Steps S..S+2 hold the same bytes (one width, optimizer state made at step 1); both sides measure all three, so
the test can take per phase the step that held least on each side: a real gloo run now and then holds a
collective's scalar buffer over into a phase (docs/memory.md), on either side, and a held-over buffer only adds.
Each rank writes root/losses_{NAME}_rank{R}.json for the trainings (RunResult.losses and step_times); rank 0 also runs
`fsdptrain estimate` on the config (2 ranks) in-process and writes its output and analytic peak to
root/estimate.json (here, where transformers' model code is already loaded).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from fsdptrain import trainer
from fsdptrain.config.schema import load_config
from fsdptrain.data import pipeline
from fsdptrain.data.encode import IGNORE, Example
from fsdptrain.dist import distributed
from fsdptrain.memory import trace
from tests.workers import finish
from tests.workers.settled import settled_collectives


def examples(n: int, seq: int) -> list[Example]:
    """Examples of one length, so a micro-batch's width is the same on every rank and only its rows differ."""
    out = []
    for i in range(n):
        ids = [(7 * i + k) % 90 + 4 for k in range(seq)]
        out.append(Example(ids, [IGNORE] * 3 + ids[3:]))
    return out


def measured(cfg, info: distributed.DistInfo, data: list[Example], step: int, repeats: int) -> dict:
    """Steps before `step` by the trainer, then the batches of steps `step`..`step + repeats - 1`, each under its
    own trace.measure_steps (their phases numbered 1..repeats)."""
    run = trainer.setup(cfg, info, data)
    try:
        run.model.train()
        it = pipeline.batches(cfg, run.sampler, run.examples, run.tokenizer.pad_token_id, 0, run.total_steps,
                              info.device_type)
        for _ in range(step - 1):
            trainer.train_step(run, next(it))
        head_run = trace.step_run(cfg, info, run.model, run.loss_head)
        phases, state = [], 0
        for n in range(repeats):  # one tracker per step: within one tracker later steps also count what earlier
            batches = next(it)  # steps left alive (a batch-sized int64 tensor per step, measured)
            tr = trace.measure_steps(run.model, run.optimizer, head_run, [batches], cfg.train.max_grad_norm)
            phases += [{**dataclasses.asdict(p), "step": n + 1} for p in tr.phases]
            state = tr.optimizer_state
        return {"phases": phases, "optimizer_state": state}
    finally:
        run.tracker.close()
        run.logger.close()
        if run.lock is not None:
            run.lock.release()


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    root, step, repeats = Path(spec["root"]), spec["step"], spec["repeats"]
    settled_collectives()  # the tracked step and its measured twin hold no collective buffer over by timing
    info = distributed.init("cpu")
    cfg = load_config(spec["config"], [])
    data = examples(cfg.train.max_steps * sum(cfg.data.micro_batch_sizes), spec["seq"])
    selective = "parallel.activation_checkpointing=selective", "parallel.precision=bf16-mixed"
    tracked = ",".join(str(step + k) for k in range(repeats))
    for name, over in (("plain", []), ("tracked", [f"memory.breakdown_steps=[{tracked}]"]),
                       ("selective_plain", [*selective]),
                       ("selective_tracked", [*selective, f"memory.breakdown_steps=[{step}]"])):
        res = trainer.train(load_config(spec["config"], [f"output_dir={root / name}", *over]), examples=data)
        (root / f"losses_{name}_rank{info.rank}.json").write_text(json.dumps(
            {"losses": res.losses, "step_times": res.step_times}))
    cfg = load_config(spec["config"], [f"output_dir={root / 'measured'}"])
    (root / f"measured_rank{info.rank}.json").write_text(json.dumps(measured(cfg, info, data, step, repeats)))
    if info.rank == 0:
        from click.testing import CliRunner

        from fsdptrain.cli import main as cli
        from fsdptrain.memory import estimate

        res = CliRunner().invoke(cli, ["estimate", spec["config"], "--nnodes", "1", "--gpus-per-node", "2"])
        peak = estimate.estimate(load_config(spec["config"], []), 1, 2, 80 << 30).peak
        (root / "estimate.json").write_text(json.dumps({"exit": res.exit_code, "output": res.output, "peak": peak}))
    distributed.barrier()
    distributed.shutdown(info)


if __name__ == "__main__":
    finish(main)
