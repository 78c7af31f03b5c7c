#!/usr/bin/env bash
# EE-Tuning Llama 2 (Chat) 70B with 8 norm + MLP exits (after layers 10, 20, ..., 80): 8 GPUs, TP 1 x PP 4 x
# DP 2, grouped-query attention (8 groups), every stage built and loaded.
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
MODEL_ARGS="--num-layers 80 --hidden-size 8192 --num-attention-heads 64 --ffn-hidden-size 28672 \
  --sequence-parallel --group-query-attention --num-query-groups 8"
EE_ARGS="--exit-layer-nums 10 20 30 40 50 60 70 80 --tune-exit-pipeline-parallel-size 4"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
