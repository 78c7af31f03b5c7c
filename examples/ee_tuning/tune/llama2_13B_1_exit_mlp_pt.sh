#!/usr/bin/env bash
# EE-Tuning Llama 2 (Chat) 13B with one norm + MLP exit after layer 10: 4 GPUs, TP 1 x PP 4. As in EE-LLM every
# stage is built although the exit sits on stage 0 (stages 1-3 have nothing to train); append
# `--tune-exit-pipeline-parallel-size 1` with NPROC_PER_NODE=1 to build and load only the first quarter.
NPROC_PER_NODE=${NPROC_PER_NODE:-4}
MODEL_ARGS="--num-layers 40 --hidden-size 5120 --num-attention-heads 40 --ffn-hidden-size 13824 \
  --query-key-layer-scaling"
EE_ARGS="--exit-layer-nums 10 --tune-exit-pipeline-parallel-size 4"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
