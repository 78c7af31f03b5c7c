"""EE-Tuning flags with EE-LLM's semantics: ``--tune-exit-pipeline-parallel-size`` defaults to 1 (only the
first stage is built, loaded and run; the rest of the world is data parallel), a default too small for the
exits is refused naming the flag, and ``--tune-exit`` without ``--load`` is refused."""

import pytest

from megatron.arguments import parse_args, resolve
from megatron.errors import ConfigError

BASE = ["--num-layers", "8", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--lr", "1e-3", "--train-iters", "10", "--mock-data", "--vocab-size", "100",
        "--pipeline-model-parallel-size", "4", "--tune-exit"]


def test_default_tunes_the_first_stage_only():
    args = parse_args(BASE + ["--exit-layer-nums", "2", "--load", "/ckpt"])
    run = resolve(args, 4)
    assert (args.tune_exit_pipeline_parallel_size, args.pipeline_model_parallel_size) == (1, 4)
    assert (run.parallel.run_pp, run.parallel.pp) == (1, 4)
    assert args.data_parallel_size == run.parallel.dp == 4  # the world is 4 replicas of stage 0


def test_default_too_small_for_the_exits_names_the_flag():
    with pytest.raises(ConfigError, match=r"--tune-exit-pipeline-parallel-size 1 stops before stage 3.*at least 4"):
        resolve(parse_args(BASE + ["--exit-layer-nums", "2", "7", "--load", "/ckpt"]), 1)
    args = parse_args(BASE + ["--exit-layer-nums", "2", "7", "--load", "/ckpt", "--tune-exit-pipeline-parallel-size", "4"])
    assert resolve(args, 4).parallel.dp == args.data_parallel_size == 1


def test_tune_exit_needs_a_checkpoint():
    # (--finetune has its own rule: it needs --load too.)
    with pytest.raises(ConfigError, match="--tune-exit .* give --load CKPT"):
        resolve(parse_args(BASE + ["--exit-layer-nums", "2"]), 1)
