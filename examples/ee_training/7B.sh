#!/usr/bin/env bash
# EE-LLM 7B: 32 layers, hidden 4096, 32 heads, TP 1 x PP 4, untied embeddings and exits, pre-exits at
# layers 9 and 17 with weights 0.1 / 0.2, ~805B tokens.
MODEL_ARGS="--num-layers 32 --hidden-size 4096 --num-attention-heads 32 \
  --tensor-model-parallel-size 1 --pipeline-model-parallel-size 4 \
  --micro-batch-size 2 --train-iters 192000 --untie-embeddings-and-output-weights"
EE_ARGS="--exit-layer-nums 9 17 --exit-layer-weight 0.1 0.2 --pre-exit --untie-exit-output-weights"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
