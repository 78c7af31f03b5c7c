#!/usr/bin/env bash
# EE-LLM 30B: 60 layers, hidden 6656, 52 heads, TP 4 x PP 4, untied embeddings and exits, pre-exits at
# layers 16 and 31 with weights 0.1 / 0.2.
MODEL_ARGS="--num-layers 60 --hidden-size 6656 --num-attention-heads 52 \
  --tensor-model-parallel-size 4 --pipeline-model-parallel-size 4 \
  --micro-batch-size 1 --train-iters 192000 --untie-embeddings-and-output-weights"
EE_ARGS="--exit-layer-nums 16 31 --exit-layer-weight 0.1 0.2 --pre-exit --untie-exit-output-weights"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
