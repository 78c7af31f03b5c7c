#!/usr/bin/env bash
# EE-Tuning Llama 2 (Chat) 70B with one norm + MLP exit after layer 20: only stage 0 of the 4-stage checkpoint
# (layers 1-20) is built and loaded (--tune-exit-pipeline-parallel-size 1), on 4 GPUs as 4 data-parallel
# replicas. The save still holds the whole model: stages 1-3 are copied unchanged from LOAD_PATH.
NPROC_PER_NODE=${NPROC_PER_NODE:-4}
MODEL_ARGS="--num-layers 80 --hidden-size 8192 --num-attention-heads 64 --ffn-hidden-size 28672 \
  --sequence-parallel --group-query-attention --num-query-groups 8"
EE_ARGS="--exit-layer-nums 20 --tune-exit-pipeline-parallel-size 1"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
