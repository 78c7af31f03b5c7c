#!/usr/bin/env bash
# EE-Tuning end to end on a laptop CPU in a few minutes, nothing downloaded:
#   1. a tiny random Llama (GQA; vocab 32000 to match the bundled Llama 2 tokenizer) saved with transformers;
#   2. convert it to our checkpoint at TP=1 PP=2 (tools/checkpoint/util.py --loader llama_hf);
#   3. add norm + MLP exits after layers 1 and 3, copy-initialised (checkpoint_converter.py add-exit);
#   4. tokenize the bundled King James Bible corpus with data/llama_sp/tokenizer.model (Llama2Tokenizer);
#   5. tune only the exits over the 2-stage pipeline (2 gloo processes, --tune-exit --finetune);
#   6. evaluate the model before and after tuning at full depth: the final head's loss (lm loss) is the same,
#      the frozen backbone untouched, and every exit's loss has fallen.
# Steps whose output exists are skipped (delete $WORK to start over). Extra arguments go to the tuning run and
# override its flags (e.g. `bash tiny_cpu.sh --train-iters 200`).
#
# Environment: WORK (/tmp/ee_tuning_tiny_cpu), EXIT_LAYERS ("1 3"), TUNE_ITERS (40), NPROC_PER_NODE (2: one
# process per stage), TUNE_STAGES (2; 1 builds, loads and tunes only stage 0 = layers 1-2 and copies stage 1 into
# the save unchanged: give it exits on stage 0 only, e.g. EXIT_LAYERS="1 2").
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WORK=${WORK:-/tmp/ee_tuning_tiny_cpu}
EXIT_LAYERS=${EXIT_LAYERS:-"1 3"}
TUNE_ITERS=${TUNE_ITERS:-40}
TUNE_STAGES=${TUNE_STAGES:-2}
NPROC_PER_NODE=${NPROC_PER_NODE:-$TUNE_STAGES}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

TOKENIZER=$ROOT/data/llama_sp/tokenizer.model
HF=$WORK/llama_tiny_hf            # the "pretrained" Hugging Face model
BASE=$WORK/llama_tiny_tp1_pp2     # converted (iteration 1)
EXITS=$WORK/llama_tiny_exits      # + untrained exits (iteration 1)
TUNED=$WORK/llama_tiny_tuned      # + tuned exits (iteration TUNE_ITERS)
DATA_PREFIX=$WORK/data/kjv_text_document
START=$SECONDS

step() { echo; echo "== [$(date +%T), +$((SECONDS - START)) s] $*"; }

step "1/6 tiny random Llama (4 layers, hidden 64, 4 heads over 2 kv groups, vocab 32000) -> $HF"
if [ ! -f "$HF/config.json" ]; then
  python - "$HF" <<'PY'
import sys

import torch
import transformers

torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  tie_word_embeddings=False)
transformers.LlamaForCausalLM(config).save_pretrained(sys.argv[1])
PY
fi

step "2/6 convert HF -> ours at TP=1 PP=2 -> $BASE"
if [ ! -f "$BASE/latest_checkpointed_iteration.txt" ]; then
  python "$ROOT/tools/checkpoint/util.py" --model-type EarlyExitGPT --loader llama_hf --saver megatron \
    --load-dir "$HF" --save-dir "$BASE" --target-tensor-parallel-size 1 --target-pipeline-parallel-size 2 \
    --tokenizer-model "$TOKENIZER"
fi

step "3/6 add norm + MLP exits after layers $EXIT_LAYERS -> $EXITS"
if [ ! -f "$EXITS/latest_checkpointed_iteration.txt" ]; then
  # shellcheck disable=SC2086  # EXIT_LAYERS is a list of numbers
  python "$ROOT/tools/checkpoint/checkpoint_converter.py" --conversion-type add-exit \
    --load-dir "$BASE" --load-iteration 1 --save-dir "$EXITS" --add-exit-layer-nums $EXIT_LAYERS \
    --use-exit-norm --use-exit-mlp
fi

step "4/6 tokenize data/corpus/kjv.jsonl.gz with the Llama 2 tokenizer"
if [ ! -f "$DATA_PREFIX.idx" ]; then
  mkdir -p "$WORK/data"
  python "$ROOT/tools/preprocess_data.py" --input "$ROOT/data/corpus/kjv.jsonl.gz" --output-prefix "$WORK/data/kjv" \
    --tokenizer-type Llama2Tokenizer --tokenizer-model "$TOKENIZER" --append-eod --workers 2
fi

# The model's shape, exits and tokenizer come from the checkpoint (--use-checkpoint-args).
DATA_ARGS="--use-checkpoint-args --device cpu --tokenizer-type Llama2Tokenizer --tokenizer-model $TOKENIZER \
  --data-path $DATA_PREFIX --split 949,50,1 --num-workers 0 --seq-length 128 --micro-batch-size 4"

step "5/6 EE-Tuning: only the exits train ($TUNE_ITERS iterations, $TUNE_STAGES of 2 stages built)"
if [ ! -f "$TUNED/latest_checkpointed_iteration.txt" ]; then
  # shellcheck disable=SC2086  # DATA_ARGS is a flag list
  torchrun --standalone --nproc_per_node "$NPROC_PER_NODE" "$ROOT/pretrain_early_exit_gpt.py" $DATA_ARGS \
    --load "$EXITS" --finetune --tune-exit --tune-exit-pipeline-parallel-size "$TUNE_STAGES" --save "$TUNED" \
    --global-batch-size 8 --train-iters "$TUNE_ITERS" --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine \
    --lr-warmup-iters 4 --weight-decay 0.0 --clip-grad 1.0 \
    --log-interval 5 --eval-iters 0 --save-interval "$TUNE_ITERS" "$@"
fi

step "6/6 evaluate at full depth on the validation split, before and after tuning"
for ckpt in "$EXITS" "$TUNED"; do
  # shellcheck disable=SC2086
  torchrun --standalone --nproc_per_node 2 "$ROOT/pretrain_early_exit_gpt.py" $DATA_ARGS \
    --load "$ckpt" --finetune --skip-train --train-iters 1 --global-batch-size 8 --lr 0 --eval-iters 8 \
    --log-interval 1 2>&1 | tee "$WORK/eval_$(basename "$ckpt").log" | grep "validation" || true
done
python - "$WORK/eval_$(basename "$EXITS").log" "$WORK/eval_$(basename "$TUNED").log" <<'PY'
import re
import sys

def losses(path):
    found = re.findall(r"((?:lm|early) loss(?: \[\d+\])?) value: ([-+.\dE]+)", open(path).read())
    if not found:
        sys.exit(f"no validation losses in {path}")
    return dict((k, float(v)) for k, v in found)

before, after = losses(sys.argv[1]), losses(sys.argv[2])
print(f"\n{'validation loss':>16} | {'before':>8} | {'after':>8}")
for key in before:
    print(f"{key:>16} | {before[key]:8.3f} | {after[key]:8.3f}")
if abs(before["lm loss"] - after["lm loss"]) > 1e-4 * before["lm loss"]:
    sys.exit("the final head's loss changed: the backbone was not frozen")
if any(after[k] >= before[k] for k in before if k.startswith("early")):
    sys.exit("an exit's validation loss did not fall")
PY
step "done in $((SECONDS - START)) s"
