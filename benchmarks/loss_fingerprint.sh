#!/usr/bin/env bash
# Every step's loss (full precision) of short 2-rank CPU runs in five variants, for checking that a refactor
# changed no arithmetic: run it on two checkouts and `diff` the outputs (they must be identical, bitwise).
#
#   benchmarks/loss_fingerprint.sh [REPO] [OUT_DIR] > before.txt   # then the same on the other checkout
#
# Variants: plain; gradient accumulation; full checkpointing + chunked loss; selective checkpointing with
# accumulation without per-micro-step sync and on_nonfinite=skip; a run of 12 steps continued to 18 from its
# step-12 checkpoint. About 2 minutes on 2 cores.
set -uo pipefail
REPO=$(cd "${1:-$(dirname "$0")/..}" && pwd)
OUT=${2:-$(mktemp -d)}
mkdir -p "$OUT"
cd "$REPO"
run() {  # run NAME MAX_STEPS [overrides...]
    local name=$1 steps=$2
    shift 2
    PYTHONPATH=$REPO OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc-per-node 2 \
        --master-addr 127.0.0.1 --master-port $((29600 + RANDOM % 1000)) \
        -m fsdptrain train output_dir="$OUT/$name" train.max_steps="$steps" logging.log_every=1 \
        logging.progress=lines data.synthetic_examples=800 checkpoint.save_every=6 "$@" > "$OUT/$name.log" 2>&1 \
        || { echo "$name FAILED (log: $OUT/$name.log)" >&2; return 1; }
}
losses() { python -c "import json,sys; print(sys.argv[1], [json.loads(l)['loss'] for l in open(sys.argv[2])])" \
    "$1" "$OUT/$2/metrics.jsonl"; }
rm -rf "${OUT:?}"/{plain,accum,ckpt,selective,resume}
run plain 12 && losses plain plain
run accum 12 train.grad_accum_steps=2 train.micro_batch_size=8 && losses accum accum
run ckpt 12 parallel.activation_checkpointing=full train.loss_chunk_tokens=256 && losses ckpt ckpt
run selective 12 parallel.activation_checkpointing=selective train.on_nonfinite=skip \
    parallel.sync_grads_every_micro_step=false train.grad_accum_steps=2 train.micro_batch_size=8 \
    && losses selective selective
run resume 12 && losses resume resume && run resume 18 && losses resumed resume
