#!/usr/bin/env bash
# EE-LLM 13B: 40 layers, hidden 5120, 40 heads, TP 2 x PP 4, untied embeddings and exits, pre-exits at
# layers 11 and 21 with weights 0.1 / 0.2.
MODEL_ARGS="--num-layers 40 --hidden-size 5120 --num-attention-heads 40 \
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 4 \
  --micro-batch-size 1 --train-iters 192000 --untie-embeddings-and-output-weights"
EE_ARGS="--exit-layer-nums 11 21 --exit-layer-weight 0.1 0.2 --pre-exit --untie-exit-output-weights"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
