#!/bin/bash
# Add early exits to a converted checkpoint (step 2 of EE-Tuning). The tp / pp layout stays the checkpoint's.
#
# Active variant: a tiny CPU run. Without LOAD_DIR it first builds a random 4-layer Llama (GQA) with
# transformers, converts it at TP=1 PP=2, then adds norm + MLP exits at layers 2 and 4 (copy-initialised).
# Pass LOAD_DIR / SAVE_DIR / EXIT_LAYERS to convert your own. Other flags: --use-exit-block,
# --random-init --init-method-std 0.02 --seed N, --tie-exit-output-weights (EE-LLM always unties),
# --target-exit-position pre (exits read the layer input; not with --use-exit-mlp).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${WORK:-/tmp/ee_tuning_tiny}
LOAD_ITER=${LOAD_ITER:-1}
EXIT_LAYERS=${EXIT_LAYERS:-"2 4"}

if [ -z "${LOAD_DIR:-}" ]; then
    LOAD_DIR=$WORK/llama_tiny_tp1_pp2
    if [ ! -f "$LOAD_DIR/latest_checkpointed_iteration.txt" ]; then
        mkdir -p "$WORK"
        python - "$WORK/llama_tiny_hf" <<'PY'
import sys, torch, transformers
torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
transformers.LlamaForCausalLM(config).save_pretrained(sys.argv[1])
PY
        CONVERTED=$LOAD_DIR
        LOAD_DIR=$WORK/llama_tiny_hf SAVE_DIR=$CONVERTED TP=1 PP=2 \
            bash "$ROOT/examples/ee_tuning/convert/convert_llama_hf.sh"
    fi
fi
SAVE_DIR=${SAVE_DIR:-$WORK/llama_tiny_tp1_pp2_2exits}

# shellcheck disable=SC2086  # EXIT_LAYERS is a list of numbers
python "$ROOT/tools/checkpoint/checkpoint_converter.py" \
    --load-dir "$LOAD_DIR" \
    --load-iteration "$LOAD_ITER" \
    --save-dir "$SAVE_DIR" \
    --add-exit-layer-nums $EXIT_LAYERS \
    --use-exit-norm \
    --use-exit-mlp

# ---------------------------------------------------------------------------------------------------------
# EE-LLM's variants (LOAD_DIR: the convert_llama_hf.sh output, LOAD_ITER=1). Uncomment one, set the dirs.
#
# CONVERTER="python $ROOT/tools/checkpoint/checkpoint_converter.py --load-dir $LOAD_DIR --load-iteration 1"
#
# Llama-2 13B (40 layers), 8 exits:
#   embedding-only exits (untied projection copied from the output layer):
#     $CONVERTER --save-dir $SAVE_DIR --add-exit-layer-nums 5 10 15 20 25 30 35 40
#   norm exits:
#     $CONVERTER --save-dir $SAVE_DIR --add-exit-layer-nums 5 10 15 20 25 30 35 40 --use-exit-norm
#   norm + MLP exits (EE-LLM's active variant):
#     $CONVERTER --save-dir $SAVE_DIR --add-exit-layer-nums 5 10 15 20 25 30 35 40 --use-exit-norm --use-exit-mlp
#   norm + layer (a copy of the last layer) exits:
#     $CONVERTER --save-dir $SAVE_DIR --add-exit-layer-nums 5 10 15 20 25 30 35 40 --use-exit-norm --use-exit-block
# Llama-2 13B, a single norm + MLP exit at layer 10:
#     $CONVERTER --save-dir $SAVE_DIR --add-exit-layer-nums 10 --use-exit-norm --use-exit-mlp
# Llama-2 13B, a single randomly initialised MLP exit at layer 10 (seeded: reproducible):
#     $CONVERTER --save-dir $SAVE_DIR --add-exit-layer-nums 10 --use-exit-norm --use-exit-mlp --random-init \
#         --init-method-std 0.02 --seed 1234
# Llama-2 70B (80 layers), 8 norm + MLP exits:
#     $CONVERTER --save-dir $SAVE_DIR --add-exit-layer-nums 10 20 30 40 50 60 70 80 --use-exit-norm --use-exit-mlp
# Llama-2 7B (32 layers), 8 norm + MLP exits:
#     $CONVERTER --save-dir $SAVE_DIR --add-exit-layer-nums 4 8 12 16 20 24 28 32 --use-exit-norm --use-exit-mlp
