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


TEACHER = ["--exit-layer-nums", "2", "7", "--load", "/ckpt", "--exit-distillation-weight", "0.5"]


def test_teacher_objectives_parse_and_need_the_whole_frozen_model():
    args = parse_args(BASE + TEACHER + ["--tune-exit-pipeline-parallel-size", "4", "--exit-estimator",
                                        "--exit-estimator-hidden", "16", "--use-exit-linear", "--exit-vocab-size", "50",
                                        "--exit-distillation-top-k", "8", "--exit-distillation-temperature", "2"])
    ee = resolve(args, 4).early_exit
    assert (ee.exit_distillation_weight, ee.exit_distillation_top_k, ee.exit_distillation_temperature) == (0.5, 8, 2.0)
    assert (ee.exit_estimator, ee.exit_estimator_hidden, ee.use_exit_linear, ee.exit_vocab_size) == (True, 16, True, 50)
    assert ee.needs_teacher
    with pytest.raises(ConfigError, match=r"--exit-distillation-weight > 0 needs the final head on the last stage: "
                                          r"--tune-exit-pipeline-parallel-size \(1\) must equal "
                                          r"--pipeline-model-parallel-size \(4\)"):
        resolve(parse_args(BASE + ["--exit-layer-nums", "2", "--load", "/ckpt", "--exit-distillation-weight", "1"]), 4)
    no_tune = [a for a in BASE if a != "--tune-exit"]
    with pytest.raises(ConfigError, match=r"--exit-estimator trains the exits against the model's own final head.*"
                                          r"needs --tune-exit"):
        resolve(parse_args(no_tune + ["--exit-layer-nums", "2", "--exit-estimator"]), 4)
    # Inference and tools may hold an estimator without training it.
    resolve(parse_args(no_tune + ["--exit-layer-nums", "2", "--exit-estimator"]), 4, training=False)


@pytest.mark.parametrize("flags, message", [
    (["--exit-distillation-weight", "1.5"], r"--exit-distillation-weight must lie in \[0, 1\], got 1.5"),
    (["--exit-distillation-top-k", "101"], r"--exit-distillation-top-k \(101\) exceeds the vocabulary \(100\)"),
    (["--exit-distillation-temperature", "0"], "--exit-distillation-temperature must be positive"),
    (["--exit-vocab-size", "101"], r"--exit-vocab-size \(101\) exceeds the vocabulary \(100\)"),
    (["--exit-estimator-hidden", "0"], "--exit-estimator-hidden must be a positive integer"),
])
def test_bad_teacher_values_name_the_flag(flags, message):
    with pytest.raises(ConfigError, match=message):
        resolve(parse_args(BASE + TEACHER + ["--tune-exit-pipeline-parallel-size", "4"] + flags), 4)
