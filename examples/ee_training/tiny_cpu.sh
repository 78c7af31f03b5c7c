#!/usr/bin/env bash
# A tiny early-exit GPT on the bundled King James Bible corpus, on CPU in about a minute (2 cores):
# tokenizes data/corpus/kjv.jsonl.gz with the bundled GPT-2 BPE files once, then trains a 4-layer model
# with exits after layers 1 and 3 over a 2-stage pipeline (2 gloo processes), evaluating and saving.
# Extra arguments override the flags below (e.g. `bash tiny_cpu.sh --train-iters 200`).
#
# Environment: WORK (where data and checkpoints go, default /tmp/ee_tiny_cpu), NPROC_PER_NODE (2).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WORK=${WORK:-/tmp/ee_tiny_cpu}
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

TOKENIZER_ARGS="--tokenizer-type GPT2BPETokenizer \
  --vocab-file $ROOT/data/gpt2/gpt2-vocab.json --merge-file $ROOT/data/gpt2/gpt2-merges.txt"
DATA_PREFIX=$WORK/data/kjv_text_document

if [ ! -f "$DATA_PREFIX.idx" ]; then
  mkdir -p "$WORK/data"
  # shellcheck disable=SC2086
  python "$ROOT/tools/preprocess_data.py" --input "$ROOT/data/corpus/kjv.jsonl.gz" \
    --output-prefix "$WORK/data/kjv" $TOKENIZER_ARGS --append-eod --workers "$NPROC_PER_NODE"
fi

MODEL_ARGS="--num-layers 4 --hidden-size 64 --num-attention-heads 4 \
  --seq-length 64 --max-position-embeddings 64 \
  --hidden-dropout 0.0 --attention-dropout 0.0"
EE_ARGS="--exit-layer-nums 1 3 --exit-layer-weight 0.3 0.5"
TRAIN_ARGS="--device cpu --pipeline-model-parallel-size 2 \
  --micro-batch-size 4 --global-batch-size 8 --train-iters 40 \
  --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 4 --weight-decay 0.1 --clip-grad 1.0 \
  --num-workers 0"
DATA_ARGS="--data-path $DATA_PREFIX --split 949,50,1 $TOKENIZER_ARGS"
OUTPUT_ARGS="--log-interval 5 --eval-interval 20 --eval-iters 2 \
  --save $WORK/checkpoints --save-interval 20 --load $WORK/checkpoints"

# shellcheck disable=SC2086
torchrun --standalone --nproc_per_node "$NPROC_PER_NODE" "$ROOT/pretrain_early_exit_gpt.py" \
  $MODEL_ARGS $EE_ARGS $TRAIN_ARGS $DATA_ARGS $OUTPUT_ARGS "$@"
