#!/bin/bash
# Serve an early-exit checkpoint at any tensor / pipeline parallel size (one node, TP x PP processes).
#
#   CHECKPOINT=/ckpt/ee-7b TOKENIZER=/tok/tokenizer.model TP=1 PP=4 examples/ee_inference/ee_inference_server.sh
#
# Then: python tools/request_client.py --use-early-exit --threshold 0.8
#   or: curl -X PUT localhost:5000/api -H 'Content-Type: application/json' \
#            -d '{"prompts": ["Hello"], "tokens_to_generate": 32, "use_early_exit": true, "early_exit_thres": 0.8}'
#
# Environment:
#   CHECKPOINT      checkpoint directory (required; the model shape is read from it: --use-checkpoint-args)
#   TOKENIZER       tokenizer model / vocab file (required unless TOKENIZER_TYPE is NullTokenizer)
#   TOKENIZER_TYPE  SentencePieceTokenizer (default), Llama2Tokenizer, GPT2BPETokenizer (needs MERGE_FILE),
#                   HuggingFaceTokenizer, NullTokenizer (needs VOCAB_SIZE)
#   TP, PP          tensor / pipeline parallel sizes (default 1, 1); TP x PP processes are started. They must
#                   be the checkpoint's: reshard it first (tools/checkpoint/util.py) to serve at other sizes
#   LOAD_ITERATION  iteration to load (default 0: the latest in the tracker file)
#   PORT, HOST      where to listen (default 5000 on 127.0.0.1; HOST=0.0.0.0 serves the network)
#   DEVICE          cuda or cpu (default: cuda when available)
#   EXTRA_ARGS      more flags for tools/run_early_exit_text_generation_server.py
set -euo pipefail

: "${CHECKPOINT:?set CHECKPOINT to the checkpoint directory}"
TP=${TP:-1}
PP=${PP:-1}
TOKENIZER_TYPE=${TOKENIZER_TYPE:-SentencePieceTokenizer}
LOAD_ITERATION=${LOAD_ITERATION:-0}
PORT=${PORT:-5000}
HOST=${HOST:-127.0.0.1}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

TOKENIZER_ARGS=(--tokenizer-type "$TOKENIZER_TYPE")
case "$TOKENIZER_TYPE" in
  SentencePieceTokenizer|Llama2Tokenizer|HuggingFaceTokenizer)
    TOKENIZER_ARGS+=(--tokenizer-model "${TOKENIZER:?set TOKENIZER to the tokenizer model}") ;;
  GPT2BPETokenizer)
    TOKENIZER_ARGS+=(--vocab-file "${TOKENIZER:?set TOKENIZER to vocab.json}" --merge-file "${MERGE_FILE:?set MERGE_FILE}") ;;
  NullTokenizer)
    TOKENIZER_ARGS+=(--vocab-size "${VOCAB_SIZE:?set VOCAB_SIZE for the NullTokenizer}") ;;
  *) echo "unknown TOKENIZER_TYPE $TOKENIZER_TYPE" >&2; exit 2 ;;
esac

DEVICE_ARGS=()
if [[ -n "${DEVICE:-}" ]]; then DEVICE_ARGS=(--device "$DEVICE"); fi

# shellcheck disable=SC2086  # EXTRA_ARGS is a list of flags
exec torchrun --nproc_per_node $((TP * PP)) --nnodes 1 --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-6000}" \
  "$REPO/tools/run_early_exit_text_generation_server.py" \
  --tensor-model-parallel-size "$TP" \
  --pipeline-model-parallel-size "$PP" \
  --load "$CHECKPOINT" \
  --load-iteration "$LOAD_ITERATION" \
  --use-checkpoint-args \
  "${TOKENIZER_ARGS[@]}" \
  "${DEVICE_ARGS[@]}" \
  --port "$PORT" \
  --host "$HOST" \
  ${EXTRA_ARGS:-}
