#!/usr/bin/env bash
# Quick start: an early-exit GPT trained on CPU from nothing but Python, in about 7-12 minutes on 2 cores.
#
#   bash examples/quickstart.sh
#
# 1. installs what is missing (tools/install_missing.py: one pip command, CPU torch pinned in it);
# 2. trains a 2048-piece SentencePiece tokenizer on the bundled King James Bible and tokenizes it
#    (both skipped when already done);
# 3. trains a 6-layer GPT with exits after layers 2 and 4 over a 2-stage pipeline (torchrun, 2 gloo
#    processes; one exit on each stage), printing training lines and per-exit validation lines;
# 4. prints each exit's held-out loss and perplexity;
# 5. generates from a few prompts at full depth and at several early-exit thresholds, and prints
#    threshold -> tokens/s, average exit layer, share of tokens equal to the full-depth output;
# 6. leaves the checkpoint and prints how to serve it and talk to it.
# A second run reuses the tokenizer, the data and the finished checkpoint (it resumes training when
# QUICKSTART_ITERS grew); delete $QUICKSTART_WORK/checkpoint to train again.
#
# Environment (defaults in brackets):
#   QUICKSTART_WORK        where tokenizer, data, checkpoint and logs go [<repo>/runs/quickstart]
#   QUICKSTART_ITERS       training iterations of 16 sequences [600]
#   QUICKSTART_HIDDEN      hidden size [128]            QUICKSTART_SEQ  sequence length [128]
#   QUICKSTART_VOCAB       SentencePiece vocabulary size [2048]
#   QUICKSTART_PROMPTS     prompt file, one prompt a line [a few verse openings]
#   QUICKSTART_THRESHOLDS  comma list of early-exit thresholds [1.0,0.9,0.8,0.6,0.4,0.2,0.0]
#   QUICKSTART_TOKENS      tokens generated per prompt [48]; prompt + tokens must fit QUICKSTART_SEQ
#   QUICKSTART_REPEATS     time each generation this often, keep the fastest [3]
#   PYTHON                 the interpreter [python3, else python]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${QUICKSTART_WORK:-$ROOT/runs/quickstart}
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
ITERS=${QUICKSTART_ITERS:-600}
HIDDEN=${QUICKSTART_HIDDEN:-128}
SEQ=${QUICKSTART_SEQ:-128}
VOCAB=${QUICKSTART_VOCAB:-2048}
THRESHOLDS=${QUICKSTART_THRESHOLDS:-1.0,0.9,0.8,0.6,0.4,0.2,0.0}
TOKENS=${QUICKSTART_TOKENS:-48}
REPEATS=${QUICKSTART_REPEATS:-3}
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
for knob in ITERS HIDDEN SEQ VOCAB TOKENS REPEATS; do
  if ! [[ ${!knob} =~ ^[1-9][0-9]*$ ]]; then
    echo "QUICKSTART_$knob must be a positive integer, got '${!knob}'" >&2; exit 2
  fi
done
if (( TOKENS >= SEQ )); then
  echo "QUICKSTART_TOKENS ($TOKENS) must be below QUICKSTART_SEQ ($SEQ): prompt + generated tokens must fit" >&2; exit 2
fi
# One thread per process: the two pipeline stages share the cores (and gloo workers hang otherwise).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
TORCHRUN=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 2)
START=$SECONDS
step() { printf '\n==> [%dm%02ds] %s\n' $(((SECONDS - START) / 60)) $(((SECONDS - START) % 60)) "$*"; }

step "1/6 checking the Python packages"
# The package and its requirements, in one pip command when something is missing (CPU torch pinned in it
# when torch is missing: an unpinned torch pulls a multi-GB CUDA build); a check when all is there.
"$PYTHON" "$ROOT/tools/install_missing.py"

DATA=$WORK/data/sp$VOCAB
SP_MODEL=$DATA/kjv_sp.model
DATA_PREFIX=$DATA/kjv_text_document
TOKENIZER_ARGS=(--tokenizer-type SentencePieceTokenizer --tokenizer-model "$SP_MODEL")
mkdir -p "$DATA"

step "2/6 tokenizer and data"
if [ ! -f "$SP_MODEL" ]; then
  # A small corpus-specific vocabulary: with GPT-2's 50257 tokens the three output heads would take
  # over 90% of the compute of a model this small, and training would be ~10x slower per token.
  (cd "$ROOT" && "$PYTHON" - "$DATA/kjv_sp" "$VOCAB") <<'EOF'
import sys
import sentencepiece as spm
from megatron.tokenizer.bundled import iter_corpus
lines = (line for doc in iter_corpus() for line in doc.split("\n") if line.strip())
spm.SentencePieceTrainer.train(sentence_iterator=lines, model_prefix=sys.argv[1], vocab_size=int(sys.argv[2]),
                               model_type="bpe", character_coverage=1.0, byte_fallback=True, bos_id=-1,
                               eos_id=-1, pad_id=-1, minloglevel=2, num_threads=2)
EOF
  echo "tokenizer: $SP_MODEL ($VOCAB pieces)"
fi
if [ ! -f "$DATA_PREFIX.idx" ]; then
  "$PYTHON" "$ROOT/tools/preprocess_data.py" --input "$ROOT/data/corpus/kjv.jsonl.gz" \
    --output-prefix "$DATA/kjv" "${TOKENIZER_ARGS[@]}" --append-eod --workers 2
fi
echo "data: $DATA_PREFIX.{bin,idx}"

step "3/6 training: 6 layers, exits after layers 2 and 4, pipeline of 2 stages, $ITERS iterations"
CKPT=$WORK/checkpoint
LOG_EVERY=$(( ITERS >= 100 ? 10 : (ITERS >= 10 ? ITERS / 5 : 1) ))
EVAL_EVERY=$(( ITERS >= 4 ? ITERS / 4 : 1 ))
MODEL_ARGS=(--num-layers 6 --hidden-size "$HIDDEN" --num-attention-heads 4 --seq-length "$SEQ"
  --max-position-embeddings "$SEQ" --hidden-dropout 0.0 --attention-dropout 0.0
  --exit-layer-nums 2 4 --exit-layer-weight 0.5 0.5)
TRAIN_ARGS=(--device cpu --pipeline-model-parallel-size 2 --micro-batch-size 4 --global-batch-size 16
  --train-iters "$ITERS" --lr 3e-3 --min-lr 3e-4 --adam-beta2 0.95 --lr-decay-style cosine
  --lr-warmup-iters $(( ITERS / 20 + 1 ))
  --weight-decay 0.1 --clip-grad 1.0 --num-workers 0 --seed 1234
  --data-path "$DATA_PREFIX" --split 949,50,1 "${TOKENIZER_ARGS[@]}"
  --log-interval "$LOG_EVERY" --eval-interval "$EVAL_EVERY" --eval-iters 4
  --save "$CKPT" --save-interval "$EVAL_EVERY")
# An earlier run (finished, interrupted after a save, or with fewer QUICKSTART_ITERS) is resumed.
if [ -f "$CKPT/latest_checkpointed_iteration.txt" ]; then TRAIN_ARGS+=(--load "$CKPT"); fi
# The console gets the training lines without their constant fields; train.log keeps everything.
QUIET='consumed samples|learning rate|global batch size|exit weight \[[0-9]+\]|loss scale|number of [a-z]+ iterations'
QUIET+='|TFLOP/s per device|peak memory \(MB\)'
"${TORCHRUN[@]}" "$ROOT/pretrain_early_exit_gpt.py" "${MODEL_ARGS[@]}" "${TRAIN_ARGS[@]}" 2>&1 \
  | tee "$WORK/train.log" \
  | sed -u -E -e "s#\| ($QUIET):[^|]*##g"

step "4/6 held-out loss of each exit (the validation split)"
grep "on validation set" "$WORK/train.log" | tail -n 1 \
  | grep -oE '(lm loss|early loss \[[0-9]+\]) value: [^ ]+' \
  | awk '{ layer = ($1 == "lm") ? "6 (final)" : substr($3, 2, length($3) - 2);
           printf "  exit after layer %-9s  loss %.3f  perplexity %8.1f\n", layer, $NF, exp($NF) }' \
  | sort -n -k4,4

step "5/6 generation at full depth and with early exits (greedy, $TOKENS tokens per prompt)"
PROMPTS=${QUICKSTART_PROMPTS:-$WORK/prompts.txt}
if [ -z "${QUICKSTART_PROMPTS:-}" ]; then
  printf '%s\n' "In the beginning God created" "And the LORD said unto Moses," \
    "Blessed are the" "The LORD is my shepherd;" > "$PROMPTS"
fi
SERVE_ARGS=(--load "$CKPT" --use-checkpoint-args "${TOKENIZER_ARGS[@]}" --device cpu)
# One prompt per batch: a decoding step ends early only once every sequence of its batch has exited.
"${TORCHRUN[@]}" "$ROOT/examples/quickstart_sweep.py" --prompts "$PROMPTS" --thresholds "$THRESHOLDS" \
  --tokens "$TOKENS" --repeats "$REPEATS" --eval-batch-size 1 --output-dir "$WORK" -- "${SERVE_ARGS[@]}"

step "6/6 done in $(((SECONDS - START) / 60))m$(((SECONDS - START) % 60))s"
SERVE=$(printf '%q ' "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 2 \
  tools/run_early_exit_text_generation_server.py "${SERVE_ARGS[@]}" --port 5000)
CLI=$(printf '%q ' "$PYTHON" tools/text_generation_cli.py --url http://127.0.0.1:5000/api --tokens "$TOKENS" \
  --use-early-exit --threshold 0.6 --stats --prompt "And God said,")
cat <<EOF
Checkpoint: $CKPT (pp = 2), tokenizer: $SP_MODEL
Table: $WORK/sweep.json, training log: $WORK/train.log

Serve it (2 processes, one per pipeline stage; Ctrl-C stops it):
  cd $(printf '%q' "$ROOT") && $SERVE
Then, in a second shell, generate with early exits:
  cd $(printf '%q' "$ROOT") && $CLI
EOF
