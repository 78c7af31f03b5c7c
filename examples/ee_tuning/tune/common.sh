#!/usr/bin/env bash
# Shared part of EE-LLM's EE-Tuning scripts (llama2_{13B,70B}_{8,1}_exit_mlp_pt.sh): launcher, data mixture,
# optimizer, tuning and logging flags (the values of EE-LLM's examples/ee_tuning/tune/*.sh). Sourced by those
# scripts after they set MODEL_ARGS, EE_ARGS and NPROC_PER_NODE; extra command-line arguments of the script are
# appended last, so they override any flag here (argparse keeps the last value),
# e.g. `bash llama2_13B_8_exit_mlp_pt.sh --train-iters 100`.
#
# Steps before this one: examples/ee_tuning/convert/convert_llama_hf.sh (HF -> ours at TP=1 PP=4, iteration 1),
# then examples/ee_tuning/add_exit_layers.sh (exits with norm + MLP at the layers the script tunes).
#
# Environment: LOAD_PATH (the checkpoint with exits; required), SAVE_PATH (where the tuned model goes),
# DATA_HOME or DATA_PATH, TOKENIZER_PATH (Llama 2's tokenizer.model), NNODES (1), NODE_RANK (0),
# MASTER_ADDR / MASTER_PORT (multi-node rendezvous), NPROC_PER_NODE, WANDB_GROUP;
# PRINT_ARGS_ONLY=1 prints the flags instead of launching (for other launchers and the tests).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
NAME=$(basename "$0" .sh)

export CUDA_DEVICE_MAX_CONNECTIONS=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

LAUNCH=(torchrun --nproc_per_node "$NPROC_PER_NODE")
if [ "${NNODES:-1}" -gt 1 ]; then
  LAUNCH+=(--nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" --master_port "${MASTER_PORT:-29500}"
           --master_addr "${MASTER_ADDR:?set MASTER_ADDR for multi-node runs}")
else
  LAUNCH+=(--standalone)
fi

# EE-LLM's tuning data: the same 15-source RedPajama / Pile mixture as full-parameter training.
DATA_HOME=${DATA_HOME:-/data}
if [ -z "${DATA_PATH:-}" ]; then
  DATA_PATH=""
  for source in .0362:redpajama-arxiv .0657:redpajama-book .2264:redpajama-c4 .4491:redpajama-cc \
      .0246:redpajama-stackexchange .0810:redpajama-code .0548:redpajama-wiki .0010:the-pile-europarl \
      .0162:the-pile-freelaw .0006:the-pile-hackernews .0005:the-pile-nih .0006:the-pile-philpaper \
      .0065:the-pile-pubmed-abstract .0318:the-pile-pubmed-central .0050:the-pile-uspto; do
    DATA_PATH="$DATA_PATH 0${source%%:*} $DATA_HOME/${source#*:}/all"
  done
fi
TOKENIZER_PATH=${TOKENIZER_PATH:-$ROOT/data/llama_sp/tokenizer.model}
LOAD_PATH=${LOAD_PATH:-}
SAVE_PATH=${SAVE_PATH:-$ROOT/checkpoints/EE-TUNE/$NAME}

GPT_ARGS="$MODEL_ARGS \
  --tensor-model-parallel-size 1 --pipeline-model-parallel-size 4 \
  --seq-length 2048 --max-position-embeddings 2048 \
  --micro-batch-size 4 --global-batch-size 16 \
  --lr 1e-4 --min-lr 1e-5 --lr-warmup-fraction .01 \
  --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-5 --clip-grad 1.0 \
  --bf16 --disable-bias-linear --use-flash-attn --normalization RMSNorm --position-embedding-type rope \
  --swiglu --untie-embeddings-and-output-weights --padded-vocab-size 32000 \
  --train-iters 40000"

TUNE_ARGS="--finetune --tune-exit --untie-exit-output-weights --use-exit-norm --use-exit-mlp $EE_ARGS"

DATA_ARGS="--data-path $DATA_PATH --split 990,9,1 \
  --tokenizer-type Llama2Tokenizer --tokenizer-model $TOKENIZER_PATH"

OUTPUT_ARGS="--log-interval 10 --log-timers-to-tracker \
  --save-interval 20000 --eval-interval 40000 --eval-iters 1 \
  --wandb-project EE-TUNE --wandb-group ${WANDB_GROUP:-$NAME} --wandb-exp-name $(date +%m%d-%H%M)"

ALL_ARGS="$GPT_ARGS $TUNE_ARGS $DATA_ARGS $OUTPUT_ARGS --load ${LOAD_PATH:-LOAD_PATH} --save $SAVE_PATH"
if [ -n "${PRINT_ARGS_ONLY:-}" ]; then  # the flags, no run
  echo "$ALL_ARGS" "$@"
  exit 0
fi
if [ -z "$LOAD_PATH" ]; then
  echo "$NAME: set LOAD_PATH to the checkpoint with exits (examples/ee_tuning/add_exit_layers.sh)" >&2
  exit 1
fi

# shellcheck disable=SC2086  # the *_ARGS strings are word-split on purpose
"${LAUNCH[@]}" "$ROOT/pretrain_early_exit_gpt.py" $ALL_ARGS "$@"
