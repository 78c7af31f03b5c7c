#!/bin/bash
# Hugging Face Llama 2 / 3 (a local directory: config.json + safetensors or .bin) -> our Megatron checkpoint
# at TP x PP, written as iteration 1 (what add_exit_layers.sh and the tuning scripts load).
#
#   LOAD_DIR=/models/Llama-2-7b-hf SAVE_DIR=/ckpt/llama2-7b-tp1-pp4 TP=1 PP=4 \
#       bash examples/ee_tuning/convert/convert_llama_hf.sh
#
# EE-LLM's defaults: TP=1, PP=4. TOKENIZER_PATH (optional): the tokenizer recorded in the checkpoint args
# (a SentencePiece tokenizer.model -> Llama2Tokenizer, or tokenizer.json -> HuggingFaceTokenizer); by default
# the model directory's own tokenizer files are used. LOADER=gguf reads a llama.cpp GGUF file instead
# (pip install gguf), and writes its tokenizer to $SAVE_DIR/tokenizer.
set -euo pipefail

LOAD_DIR=${LOAD_DIR:?set LOAD_DIR to the Hugging Face model directory}
SAVE_DIR=${SAVE_DIR:?set SAVE_DIR to the output checkpoint directory}
TP=${TP:-1}
PP=${PP:-4}
LOADER=${LOADER:-llama2_hf}
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)

TOKENIZER_ARGS=()
if [ -n "${TOKENIZER_PATH:-}" ]; then
    TOKENIZER_ARGS=(--tokenizer-model "$TOKENIZER_PATH")
fi

python "$ROOT/tools/checkpoint/util.py" \
    --model-type EarlyExitGPT \
    --loader "$LOADER" \
    --saver megatron \
    --target-tensor-parallel-size "$TP" \
    --target-pipeline-parallel-size "$PP" \
    --load-dir "$LOAD_DIR" \
    --save-dir "$SAVE_DIR" \
    "${TOKENIZER_ARGS[@]}"
