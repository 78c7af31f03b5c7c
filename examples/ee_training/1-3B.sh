#!/usr/bin/env bash
# EE-LLM 1.3B: 24 layers, hidden 2048, 32 heads, TP 1 x PP 4, tied embeddings, pre-exits at layers 7 and
# 13 (after layers 6 and 12, the first layers of stages 1 and 2) with weights 0.25 / 0.5, ~302B tokens.
MODEL_ARGS="--num-layers 24 --hidden-size 2048 --num-attention-heads 32 \
  --tensor-model-parallel-size 1 --pipeline-model-parallel-size 4 \
  --micro-batch-size 4 --train-iters 72000"
EE_ARGS="--exit-layer-nums 7 13 --exit-layer-weight 0.25 0.5 --pre-exit"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
