"""Every validation rule of the one configuration step (``resolve``): the bad configuration is refused and the
error names the flag."""

import pytest
import torch

from megatron.arguments import REFUSED_FLAGS, parse_args, resolve
from megatron.config import ConfigError
from megatron.run_config import LoggingConfig, ParallelConfig, TrainingConfig

BASE = ["--num-layers", "8", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--lr", "1e-3", "--train-iters", "10", "--mock-data", "--vocab-size", "100"]
PP4 = ["--pipeline-model-parallel-size", "4"]
TUNE = ["--tune-exit", "--exit-layer-nums", "2"]

# (id, extra flags, world size, text the error must contain)
RULES = [
    ("exit-zero", ["--exit-layer-nums", "0"], 1, "--exit-layer-nums"),
    ("exit-beyond", ["--exit-layer-nums", "9"], 1, "--exit-layer-nums"),
    ("exit-unsorted", ["--exit-layer-nums", "4", "2"], 1, "--exit-layer-nums"),
    ("exit-duplicate", ["--exit-layer-nums", "2", "2"], 1, "--exit-layer-nums"),
    ("weight-length", ["--exit-layer-nums", "2", "4", "--exit-layer-weight", "0.5"], 1, "--exit-layer-weight "),
    ("init-length", ["--exit-layer-nums", "2", "--exit-layer-weight-init", "0", "0"], 1, "--exit-layer-weight-init"),
    ("temperature-length", ["--exit-layer-nums", "2", "--exit-layer-temperature", "1", "2"], 1,
     "--exit-layer-temperature"),
    ("temperature-positive", ["--exit-layer-nums", "2", "--exit-layer-temperature", "0"], 1,
     "--exit-layer-temperature"),
    ("weight-warmup-negative", ["--exit-layer-nums", "2", "--exit-layer-weight-warmup-iters", "-1"], 1,
     "--exit-layer-weight-warmup-iters"),
    ("exit-mlp-needs-exits", ["--use-exit-mlp"], 1, "--use-exit-mlp"),
    ("exit-mlp-pre-exit", ["--use-exit-mlp", "--pre-exit", "--exit-layer-nums", "2"], 1, "--pre-exit"),
    ("tune-pp-above-pp", TUNE + ["--tune-exit-pipeline-parallel-size", "5"] + PP4, 4,
     "--tune-exit-pipeline-parallel-size"),
    ("tune-pp-zero", TUNE + ["--tune-exit-pipeline-parallel-size", "0"] + PP4, 4,
     "--tune-exit-pipeline-parallel-size"),
    ("tune-pp-before-exit", ["--tune-exit", "--exit-layer-nums", "7", "--tune-exit-pipeline-parallel-size", "2"]
     + PP4, 2, "--tune-exit-pipeline-parallel-size 2 stops before stage 3"),
    ("tune-pp-without-tune", ["--tune-exit-pipeline-parallel-size", "2"] + PP4, 4, "--tune-exit"),
    ("tune-without-exits", ["--tune-exit"], 1, "--exit-layer-nums"),
    ("tune-with-vpp", TUNE + PP4 + ["--num-layers-per-virtual-pipeline-stage", "1"], 4,
     "--num-layers-per-virtual-pipeline-stage"),
    ("tune-world", TUNE + PP4 + ["--tune-exit-pipeline-parallel-size", "2"], 3, "world size 3"),
    ("layers-not-divisible", ["--num-layers", "6"] + PP4, 4, "--layers-per-stage"),
    ("layers-per-stage-sum", ["--layers-per-stage", "3", "3", "1", "0"] + PP4, 4, "--layers-per-stage"),
    ("layers-per-stage-count", ["--layers-per-stage", "4", "4"] + PP4, 4, "--layers-per-stage"),
    ("global-batch", ["--global-batch-size", "6", "--micro-batch-size", "4"], 1, "--global-batch-size"),
    ("global-batch-dp", ["--global-batch-size", "3"], 2, "--micro-batch-size"),
    ("micro-batch", ["--micro-batch-size", "0"], 1, "--micro-batch-size"),
    ("fp16-bf16", ["--fp16", "--bf16"], 1, "--fp16 and --bf16"),
    ("world-tp-pp", ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 6,
     "--tensor-model-parallel-size"),
    ("heads-tp", ["--num-attention-heads", "2", "--tensor-model-parallel-size", "4"], 4, "--num-attention-heads"),
    ("groups-tp", ["--group-query-attention", "--num-query-groups", "2", "--tensor-model-parallel-size", "4"], 4,
     "--num-query-groups"),
    ("groups-need-gqa", ["--num-query-groups", "2"], 1, "--group-query-attention"),
    ("hidden-heads", ["--hidden-size", "30"], 1, "--hidden-size"),
    ("seq-parallel-seq", ["--sequence-parallel", "--tensor-model-parallel-size", "2", "--seq-length", "15",
                          "--max-position-embeddings", "16"], 2, "--sequence-parallel"),
    ("fill-pp1", ["--fill-explicit-bubbles", "--exit-layer-nums", "2"], 1, "--fill-explicit-bubbles"),
    ("fill-no-exits", ["--fill-explicit-bubbles"] + PP4, 4, "--exit-layer-nums"),
    ("fill-negative", ["--fill-explicit-bubbles", "--exit-layer-nums", "2", "--num-fill-warmup-microbatches", "-1"]
     + PP4, 4, "--num-fill-warmup-microbatches"),
    ("fill-ratio", ["--fill-explicit-bubbles", "--exit-layer-nums", "2", "--backward-forward-ratio", "0"] + PP4, 4,
     "--backward-forward-ratio"),
    ("fill-vpp", ["--fill-explicit-bubbles", "--exit-layer-nums", "2", "--num-layers-per-virtual-pipeline-stage",
                  "1"] + PP4, 4, "--num-layers-per-virtual-pipeline-stage"),
    ("fill-tune", ["--fill-explicit-bubbles"] + TUNE + PP4, 4, "--tune-exit"),
    ("vpp-too-big", ["--num-layers-per-virtual-pipeline-stage", "4"] + PP4, 4, "fewer layers than chunks"),
    ("vpp-not-dividing", ["--num-layers-per-virtual-pipeline-stage", "3", "--pipeline-model-parallel-size", "2"], 2,
     "--num-layers-per-virtual-pipeline-stage"),
    ("vpp-pp1", ["--num-layers-per-virtual-pipeline-stage", "2"], 1, "--pipeline-model-parallel-size > 1"),
    ("vpp-uneven", ["--num-layers-per-virtual-pipeline-stage", "2", "--pipeline-model-parallel-size", "2",
                    "--layers-per-stage", "6", "2"], 2, "--num-layers-per-virtual-pipeline-stage"),
    ("iters-and-samples", ["--train-samples", "100"], 1, "--train-samples"),
    ("no-run-length", [], 1, "--train-iters", ["--train-iters"]),
    ("warmup-fraction-and-iters", ["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "2"], 1,
     "--lr-warmup-fraction"),
    ("warmup-not-shorter", ["--lr-warmup-iters", "10"], 1, "--lr-warmup-iters"),
    ("samples-with-decay-iters", ["--train-samples", "100", "--lr-decay-iters", "5"], 1, "--lr-decay-iters",
     ["--train-iters"]),
    ("missing-lr", [], 1, "--lr", ["--lr"]),
    ("no-data", [], 1, "--mock-data", ["--mock-data"]),
    ("min-lr", ["--min-lr", "1.0"], 1, "--min-lr"),
    ("wd-start-constant", ["--start-weight-decay", "0.1"], 1, "--start-weight-decay"),
    ("wd-incr-needs-ends", ["--weight-decay-incr-style", "linear"], 1, "--end-weight-decay"),
    ("loss-scale", ["--fp16", "--loss-scale", "-2"], 1, "--loss-scale"),
    ("fp16-lm-cross-entropy", ["--fp16-lm-cross-entropy"], 1, "--fp16-lm-cross-entropy"),
    ("load-iteration", ["--load-iteration", "5"], 1, "--load-iteration"),
    ("use-checkpoint-args", ["--use-checkpoint-args"], 1, "--use-checkpoint-args"),
    ("finetune", ["--finetune"], 1, "--finetune"),
    ("save-interval", ["--save", "/tmp/ckpt"], 1, "--save-interval"),
    ("nccl-on-cpu", ["--device", "cpu", "--distributed-backend", "nccl"], 1, "--distributed-backend"),
    ("mock-and-path", ["--data-path", "/d/x"], 1, "--mock-data"),
    ("path-needs-tokenizer", ["--data-path", "/d/x"], 1, "--tokenizer-type", ["--mock-data"]),
    ("blend-odd", ["--data-path", "0.5", "/d/x", "/d/y", "--tokenizer-type", "NullTokenizer"], 1, "--data-path",
     ["--mock-data"]),
    ("blend-weight", ["--data-path", "a", "/d/x", "0.5", "/d/y", "--tokenizer-type", "NullTokenizer"], 1,
     "--data-path", ["--mock-data"]),
    ("blend-valid", ["--train-data-path", "/d/x", "--valid-data-path", "1", "/d/y", "/d/z", "--tokenizer-type",
                     "NullTokenizer"], 1, "--valid-data-path", ["--mock-data"]),
    ("split", ["--split", "a,b"], 1, "--split"),
    ("path-exclusive", ["--data-path", "/d/x", "--train-data-path", "/d/y", "--tokenizer-type", "NullTokenizer"], 1,
     "--train-data-path", ["--mock-data"]),
    ("mock-vocab", ["--vocab-size", "1"], 1, "--vocab-size"),
    ("seq-beyond-positions", ["--max-position-embeddings", "8"], 1, "--max-position-embeddings"),
    ("no-position-embedding", ["--no-position-embedding"], 1, "--position-embedding-type rope"),
    ("missing-layers", ["--num-layers", "0"], 1, "--num-layers"),
    ("recompute", ["--recompute-granularity", "full"], 1, "--recompute-method"),
    ("log-interval", ["--log-interval", "0"], 1, "--log-interval"),
    ("eval-interval", ["--eval-interval", "0"], 1, "--eval-interval"),
    ("exit-interval", ["--exit-interval", "0"], 1, "--exit-interval"),
    ("padded-vocab", ["--padded-vocab-size", "7", "--tensor-model-parallel-size", "2"], 2, "--padded-vocab-size"),
]


def _validate(flags, world, drop=()):
    """BASE without the flags in ``drop`` (each with its value, if any), plus ``flags``."""
    argv = list(BASE)
    for flag in drop:
        i = argv.index(flag)
        del argv[i:i + (2 if i + 1 < len(argv) and not argv[i + 1].startswith("--") else 1)]
    return resolve(parse_args(argv + flags), world)


@pytest.mark.parametrize("flags,world,needle,drop", [(r[1], r[2], r[3], r[4] if len(r) > 4 else ()) for r in RULES],
                         ids=[r[0] for r in RULES])
def test_rule_names_the_flag(flags, world, needle, drop):
    with pytest.raises(ConfigError) as err:
        _validate(flags, world, drop)
    assert needle in str(err.value)


def test_every_refused_flag_is_refused_by_name():
    values = {"batch_size": "4", "warmup": "4", "model_parallel_size": "2", "num_experts": "8",
              "fp8": "hybrid", "rotary_seq_len_interpolation_factor": "2", "rampup_batch_size": "16"}
    for dest, (flag, _, _) in REFUSED_FLAGS.items():
        extra = [flag, values[dest]] if dest in values else [flag]
        with pytest.raises(ConfigError, match=flag):
            resolve(parse_args(BASE + extra), 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda():
    with pytest.raises(ConfigError, match="--device cuda"):
        resolve(parse_args(BASE + ["--device", "cuda"]), 1)


def test_cuda_with_gloo_is_refused_not_run_on_the_cpu(monkeypatch):
    """--device cuda --distributed-backend gloo used to build the process groups on the CPU without a word:
    gloo moves CUDA tensors for broadcast and all-reduce only, so the run is refused before it starts."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="--distributed-backend gloo cannot run --device cuda"):
        resolve(parse_args(BASE + ["--device", "cuda", "--distributed-backend", "gloo"]), 2)
    assert resolve(parse_args(BASE + ["--device", "cuda"]), 2).parallel.distributed_backend == "nccl"


def test_valid_variants_pass():
    """Rules that EE-LLM has and we relax on purpose, and combinations that must stay allowed."""
    ok = [
        ["--exit-layer-nums", "2", "4", "--use-exit-mlp", "--use-exit-block"],  # MLP + block (issue 3)
        ["--exit-layer-nums", "3", "--num-layers-per-virtual-pipeline-stage", "1"] + PP4,  # exits with vpp
        ["--exit-layer-nums", "8"] + PP4,  # an exit on the last stage
        ["--exit-layer-nums", "2", "--pre-exit", "--use-exit-norm", "--use-exit-block"],
        TUNE + PP4 + ["--tune-exit-pipeline-parallel-size", "1", "--load", "/ckpt"],
    ]
    worlds = [1, 4, 4, 1, 4]
    for flags, world in zip(ok, worlds):
        resolve(parse_args(BASE + flags), world)


def test_not_training_skips_run_checks():
    argv = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16"]
    with pytest.raises(ConfigError, match="--vocab-size"):
        resolve(parse_args(argv), 1, training=False)  # the vocabulary must be known: a tokenizer's or the flag
    assert resolve(parse_args(argv), 1, training=False, vocab_size=50).model.vocab_size == 50
    with pytest.raises(ConfigError, match="--train-iters"):
        resolve(parse_args(argv + ["--mock-data", "--vocab-size", "9", "--lr", "1"]), 1)


def test_sections_built_in_code_are_checked_too():
    """Core code and tools may build sections directly; their validate() names the flags as well."""
    with pytest.raises(ConfigError, match="--tensor-model-parallel-size"):
        ParallelConfig(tp=0).validate()
    with pytest.raises(ConfigError, match="--pipeline-model-parallel-size > 1"):
        ParallelConfig(pp=1, vpp=2).validate()
    with pytest.raises(ConfigError, match="--tune-exit-pipeline-parallel-size"):
        ParallelConfig(pp=2, run_pp=3).validate()
    with pytest.raises(ConfigError, match="--num-fill-cooldown-microbatches"):
        TrainingConfig(train_iters=1, fill_explicit_bubbles=True, num_fill_warmup_microbatches=2,
                       num_fill_cooldown_microbatches=3).validate(dp=1, pp=4)
    with pytest.raises(ConfigError, match="num_microbatches"):
        TrainingConfig(train_iters=1, global_batch_size=4, num_microbatches=2).validate(dp=1, pp=1)
    with pytest.raises(ConfigError, match="--timing-log-level"):
        LoggingConfig(timing_log_level=3).validate()
    run = resolve(parse_args(BASE + ["--pipeline-model-parallel-size", "2"]), 2)
    run.parallel.run_pp = 1
    with pytest.raises(ConfigError, match="--tune-exit"):
        run.validate()
    run = resolve(parse_args(BASE), 1)
    run.model.sequence_parallel = True  # the rule spans the model (its home) and the parallel layout
    with pytest.raises(ConfigError, match="--sequence-parallel"):
        run.validate()
    with pytest.raises(ConfigError, match="--distributed-backend gloo cannot run --device cuda"):
        ParallelConfig(device="cuda", distributed_backend="gloo").validate()
