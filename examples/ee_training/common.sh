#!/usr/bin/env bash
# Shared part of EE-LLM's full-parameter training scripts (1-3B.sh, 7B.sh, 13B.sh, 30B.sh): launcher,
# data mixture, optimizer, logging. Sourced by those scripts after they set MODEL_ARGS and EE_ARGS;
# extra command-line arguments of the script are appended last, so they override any flag here
# (argparse keeps the last value), e.g. `bash 1-3B.sh --train-iters 100 --num-layers 4`.
#
# Environment: NNODES (1), NODE_RANK (0), MASTER_ADDR / MASTER_PORT (multi-node rendezvous),
# NPROC_PER_NODE (8), DATA_HOME or DATA_PATH, TOKENIZER_PATH, CHECKPOINT_PATH, WANDB_GROUP;
# PRINT_ARGS_ONLY=1 prints the flags instead of launching (used by slurm.sbatch).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

export CUDA_DEVICE_MAX_CONNECTIONS=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
if [ "$NNODES" -eq 1 ]; then
  DIST_ARGS="--standalone --nproc_per_node $NPROC_PER_NODE"
else
  DIST_ARGS="--nproc_per_node $NPROC_PER_NODE --nnodes $NNODES --node_rank $NODE_RANK \
    --master_addr ${MASTER_ADDR:?set MASTER_ADDR for multi-node runs} --master_port ${MASTER_PORT:-29500}"
fi

# The 15-source Data-Juicer-refined RedPajama / Pile mixture of EE-LLM (weights, then prefixes).
DATA_HOME=${DATA_HOME:-/data}
DATA_PATH=${DATA_PATH:-"\
0.0362 $DATA_HOME/redpajama-arxiv/all \
0.0657 $DATA_HOME/redpajama-book/all \
0.2264 $DATA_HOME/redpajama-c4/all \
0.4491 $DATA_HOME/redpajama-cc/all \
0.0246 $DATA_HOME/redpajama-stackexchange/all \
0.0810 $DATA_HOME/redpajama-code/all \
0.0548 $DATA_HOME/redpajama-wiki/all \
0.0010 $DATA_HOME/the-pile-europarl/all \
0.0162 $DATA_HOME/the-pile-freelaw/all \
0.0006 $DATA_HOME/the-pile-hackernews/all \
0.0005 $DATA_HOME/the-pile-nih/all \
0.0006 $DATA_HOME/the-pile-philpaper/all \
0.0065 $DATA_HOME/the-pile-pubmed-abstract/all \
0.0318 $DATA_HOME/the-pile-pubmed-central/all \
0.0050 $DATA_HOME/the-pile-uspto/all"}
TOKENIZER_PATH=${TOKENIZER_PATH:-$ROOT/data/llama_sp/tokenizer.model}
CHECKPOINT_PATH=${CHECKPOINT_PATH:-$ROOT/checkpoints/$(basename "$0" .sh)}

GPT_ARGS="$MODEL_ARGS \
  --seq-length 2048 --max-position-embeddings 2048 \
  --global-batch-size 2048 \
  --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2000 \
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 \
  --init-method-std 0.01 --bf16 --disable-bias-linear --use-flash-attn \
  --normalization RMSNorm --position-embedding-type rope --swiglu --sequence-parallel"

DATA_ARGS="--data-path $DATA_PATH --split 990,9,1 \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model $TOKENIZER_PATH"

OUTPUT_ARGS="--log-interval 2 --log-timers-to-tracker \
  --save-interval 2400 --eval-interval 1200 --eval-iters 10 \
  --wandb-project EE-LLM --wandb-group ${WANDB_GROUP:-$(basename "$0" .sh)} --wandb-exp-name $(date +%m%d-%H%M)"

ALL_ARGS="$GPT_ARGS $EE_ARGS $DATA_ARGS $OUTPUT_ARGS --save $CHECKPOINT_PATH --load $CHECKPOINT_PATH"
if [ -n "${PRINT_ARGS_ONLY:-}" ]; then  # for other launchers (slurm.sbatch): the flags, no run
  echo "$ALL_ARGS" "$@"
  exit 0
fi

# shellcheck disable=SC2086  # the *_ARGS strings are word-split on purpose
torchrun $DIST_ARGS "$ROOT/pretrain_early_exit_gpt.py" $ALL_ARGS "$@"
