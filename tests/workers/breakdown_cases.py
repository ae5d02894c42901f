"""The launched side of test_breakdown.py: one 2-rank gloo group runs five trainings of the same config.

Usage (under torchrun): python -m tests.workers.breakdown_cases SPEC.json
SPEC: {"config": yaml, "root": dir, "step": S, "seq": width}
  plain/    : trained as configured (no memory.breakdown_steps)
  tracked/  : memory.breakdown_steps=[S] (writes memory/breakdown_step{S}_rank{R}.json)
  selective_plain/, selective_tracked/ : the same two with selective activation checkpointing and bf16-mixed
  measured/ : steps 1..S-1 by the trainer, then step S under memory.trace.measure_steps (the tracker function of
              `estimate --trace`), written to root/measured_rank{R}.json
Each rank writes root/losses_{NAME}_rank{R}.json for the trainings (RunResult.losses and step_times); rank 0 also runs
`fsdptrain estimate` on the config (2 ranks) in-process and writes its output and analytic peak to
root/estimate.json (here, where transformers' model code is already loaded).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from fsdptrain import distributed, trainer
from fsdptrain.config import load_config
from fsdptrain.data import pipeline
from fsdptrain.data.encode import IGNORE, Example
from fsdptrain.memory import trace
from tests.workers.settled import settled_collectives


def examples(n: int, seq: int) -> list[Example]:
    """Examples of one length, so a micro-batch's width is the same on every rank and only its rows differ."""
    out = []
    for i in range(n):
        ids = [(7 * i + k) % 90 + 4 for k in range(seq)]
        out.append(Example(ids, [IGNORE] * 3 + ids[3:]))
    return out


def measured(cfg, info: distributed.DistInfo, data: list[Example], step: int) -> dict:
    """Steps before `step` by the trainer, then step `step`'s batches under trace.measure_steps."""
    run = trainer.setup(cfg, info, data)
    try:
        run.model.train()
        it = pipeline.batches(cfg, run.sampler, run.examples, run.tokenizer.pad_token_id, 0, run.total_steps,
                              info.device_type)
        for _ in range(step - 1):
            trainer.train_step(run, next(it))
        batches = next(it)
        head_run = trace.step_run(cfg, info, run.model, run.loss_head)
        tr = trace.measure_steps(run.model, run.optimizer, head_run, [batches], cfg.train.max_grad_norm)
        return {"phases": [dataclasses.asdict(p) for p in tr.phases], "optimizer_state": tr.optimizer_state}
    finally:
        run.tracker.close()
        run.logger.close()
        if run.lock is not None:
            run.lock.release()


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    root, step = Path(spec["root"]), spec["step"]
    settled_collectives()  # the tracked step and its measured twin hold no collective buffer over by timing
    info = distributed.init("cpu")
    cfg = load_config(spec["config"], [])
    data = examples(cfg.train.max_steps * sum(cfg.data.micro_batch_sizes), spec["seq"])
    selective = "parallel.activation_checkpointing=selective", "parallel.precision=bf16-mixed"
    for name, over in (("plain", []), ("tracked", [f"memory.breakdown_steps=[{step}]"]),
                       ("selective_plain", [*selective]),
                       ("selective_tracked", [*selective, f"memory.breakdown_steps=[{step}]"])):
        res = trainer.train(load_config(spec["config"], [f"output_dir={root / name}", *over]), examples=data)
        (root / f"losses_{name}_rank{info.rank}.json").write_text(json.dumps(
            {"losses": res.losses, "step_times": res.step_times}))
    cfg = load_config(spec["config"], [f"output_dir={root / 'measured'}"])
    (root / f"measured_rank{info.rank}.json").write_text(json.dumps(measured(cfg, info, data, step)))
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
    main()
