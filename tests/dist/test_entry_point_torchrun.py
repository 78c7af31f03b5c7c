"""``pretrain_early_exit_gpt.py`` as users launch it: EE-LLM's 1-3B.sh under torchrun (shrunk sizes, real
data), a plain ``python`` process, and a bad flag refused before any process group exists."""

import os
import re
import subprocess
import sys

import pytest

from megatron.checkpoint import read_tracker
from megatron.testing.training import tiny_argv

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENTRY = os.path.join(ROOT, "pretrain_early_exit_gpt.py")


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **extra}


def _preprocess(tmp_path) -> str:
    prefix = tmp_path / "kjv"
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input",
                    os.path.join(ROOT, "data", "corpus", "kjv_sample.jsonl"), "--output-prefix", str(prefix),
                    "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                    os.path.join(ROOT, "data", "llama_sp", "tokenizer.model"), "--append-eod", "--workers", "1"],
                   check=True, capture_output=True, env=_env())
    return f"{prefix}_text_document"


@pytest.mark.slow
def test_ee_llm_1_3b_script_runs_shrunk_under_torchrun(tmp_path):
    """examples/ee_training/1-3B.sh unchanged except sizes (appended flags override): bf16, RMSNorm, rope,
    SwiGLU, sequence parallelism, pre-exits, SentencePiece data, W&B flags without wandb installed,
    on 4 CPU processes with tp 2 x pp 2."""
    shrink = ("--num-layers 4 --hidden-size 32 --num-attention-heads 4 --tensor-model-parallel-size 2 "
              "--pipeline-model-parallel-size 2 --micro-batch-size 1 --global-batch-size 4 --seq-length 32 "
              "--max-position-embeddings 32 --train-iters 3 --lr-warmup-iters 1 --exit-layer-nums 2 3 "
              "--eval-iters 1 --log-interval 1 --num-workers 0").split()
    env = _env(NPROC_PER_NODE="4", DATA_PATH=_preprocess(tmp_path), CHECKPOINT_PATH=str(tmp_path / "ckpt"))
    out = subprocess.run(["bash", os.path.join(ROOT, "examples", "ee_training", "1-3B.sh"), *shrink],
                         capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith(" iteration")]
    assert [re.search(r"iteration +(\d+)/ +3 \|", line).group(1) for line in lines] == ["1", "2", "3"]
    for line in lines:  # every stage's exits reach the one console line
        assert "| lm loss: " in line and "| early loss [2]: " in line and "| early loss [3]: " in line
        assert "| exit weight [2]: 2.500000E-01 |" in line and "| exit weight [3]: 5.000000E-01 |" in line
    assert read_tracker(str(tmp_path / "ckpt")) == (3, False)


def test_plain_python_process_trains_and_refuses_bad_flags(tmp_path):
    ok = subprocess.run([sys.executable, ENTRY, *tiny_argv(train_iters=2)], capture_output=True, text=True,
                        env=_env(), timeout=120)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert " iteration        2/       2 | consumed samples:           16 |" in ok.stdout
    bad = subprocess.run([sys.executable, ENTRY, *tiny_argv(exit_layer_nums="9")], capture_output=True, text=True,
                         env=_env(WORLD_SIZE="4"), timeout=120)
    assert bad.returncode == 2
    assert "error: --exit-layer-nums: layer 9 is outside 1..--num-layers (4)" in bad.stderr


def test_a_refusal_under_torchrun_is_one_line_per_rank_without_tracebacks(tmp_path):
    """Every rank meets the same missing --data-path: each says so in one line carrying its rank and exits 2
    (torchrun stops the other ranks when the first exits, so one or both lines; the launcher's own failure
    summary follows, it is torchrun's)."""
    missing = str(tmp_path / "none")
    argv = [a for a in tiny_argv(num_workers=0) if a != "--mock-data"]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          ENTRY, *argv, "--data-path", missing, "--tokenizer-type", "NullTokenizer"],
                         capture_output=True, text=True, env=_env(), timeout=180)
    assert out.returncode != 0
    ours = [line for line in out.stderr.splitlines() if "pretrain_early_exit_gpt.py: error:" in line]
    want = f"pretrain_early_exit_gpt.py: error: {missing}.idx not found"
    ranks = [line.split(" pretrain")[0] for line in ours]
    assert 1 <= len(ranks) == len(set(ranks)) and set(ranks) <= {"[rank 0/2]", "[rank 1/2]"}, out.stderr[-3000:]
    assert all(want in line for line in ours)
    assert f'File "{ROOT}' not in out.stderr, out.stderr[-3000:]  # no traceback through our code
    assert "exitcode  : 2" in out.stderr
