#!/usr/bin/env bash
# EE-Tuning Llama 2 (Chat) 13B with 8 norm + MLP exits (after layers 5, 10, ..., 40): 8 GPUs, TP 1 x PP 4 x
# DP 2, every stage built and loaded. LOAD_PATH: add_exit_layers.sh --add-exit-layer-nums 5 10 15 20 25 30 35 40
# --use-exit-norm --use-exit-mlp on the converted model.
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
MODEL_ARGS="--num-layers 40 --hidden-size 5120 --num-attention-heads 40 --ffn-hidden-size 13824 \
  --query-key-layer-scaling"
EE_ARGS="--exit-layer-nums 5 10 15 20 25 30 35 40 --tune-exit-pipeline-parallel-size 4"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
