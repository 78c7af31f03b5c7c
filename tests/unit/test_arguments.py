"""EE-LLM's launch-script flag sets parse and validate; derived values; defaults; args <-> configs."""

import dataclasses
import logging

import pytest
import torch

from megatron.arguments import IGNORED_FLAGS, parse_args, resolve
from megatron.config import EarlyExitConfig, ModelConfig
from megatron.optimizer.config import OptimizerConfig
from megatron.run_config import RunConfig

DATA = ["--data-path", "0.0362", "/data/redpajama-arxiv/all", "0.0657", "/data/redpajama-book/all",
        "--split", "990,9,1"]


def training_script(tp, pp, layers, hidden, heads, micro, iters, exits, weights, untie, seq=2048):
    """examples/ee_training/{1-3B,7B,13B,30B}.sh: GPT_ARGS, EE_ARGS, DATA_ARGS, OUTPUT_ARGS, --save/--load."""
    gpt = ["--tensor-model-parallel-size", tp, "--pipeline-model-parallel-size", pp, "--num-layers", layers,
           "--hidden-size", hidden, "--num-attention-heads", heads, "--seq-length", seq,
           "--max-position-embeddings", seq, "--sequence-parallel", "--micro-batch-size", micro,
           "--global-batch-size", "2048", "--lr", "0.0003", "--train-iters", iters, "--lr-decay-style", "cosine",
           "--min-lr", "3.0e-5", "--weight-decay", "1e-1", "--lr-warmup-iters", "2000", "--adam-beta1", "0.9",
           "--adam-beta2", "0.95", "--init-method-std", "0.01", "--clip-grad", "1.0", "--bf16",
           "--disable-bias-linear", "--use-flash-attn", "--normalization", "RMSNorm",
           "--position-embedding-type", "rope", "--swiglu"]
    gpt += ["--untie-embeddings-and-output-weights"] if untie else []
    ee = (["--untie-exit-output-weights"] if untie else []) + ["--exit-layer-nums", *exits,
                                                               "--exit-layer-weight", *weights, "--pre-exit"]
    data = DATA + ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "/tok/tokenizer.model"]
    out = ["--log-interval", "2", "--log-timers-to-tracker", "--save-interval", "2400", "--eval-interval", "1200",
           "--eval-iters", "10", "--wandb-project", "EE-LLM", "--wandb-group", "1B-EXIT-6-12",
           "--wandb-exp-name", "1128-1200", "--save", "/ckpt/EE-LLM", "--load", "/ckpt/EE-LLM"]
    return [str(x) for x in gpt + ee + data + out]


def tuning_script(layers, hidden, heads, ffn, exits, tune_pp, extra):
    """examples/ee_tuning/tune/llama2_*_mlp_pt.sh."""
    gpt = ["--tensor-model-parallel-size", 1, "--pipeline-model-parallel-size", 4, *extra, "--num-layers", layers,
           "--hidden-size", hidden, "--num-attention-heads", heads, "--seq-length", 2048,
           "--max-position-embeddings", 2048, "--micro-batch-size", 4, "--global-batch-size", 16, "--lr", "0.0001",
           "--train-iters", 40000, "--min-lr", "1.0e-5", "--lr-warmup-fraction", ".01", "--adam-beta1", "0.9",
           "--adam-beta2", "0.95", "--adam-eps", "1e-5", "--clip-grad", "1.0", "--bf16", "--disable-bias-linear",
           "--use-flash-attn", "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--swiglu",
           "--exit-layer-nums", *exits, "--use-exit-norm", "--use-exit-mlp", "--untie-embeddings-and-output-weights",
           "--untie-exit-output-weights", "--padded-vocab-size", 32000, "--ffn-hidden-size", ffn, "--finetune",
           "--tune-exit-pipeline-parallel-size", tune_pp, "--tune-exit"]
    data = DATA + ["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", "/m/tokenizer/tokenizer.model"]
    out = ["--log-interval", 10, "--log-timers-to-tracker", "--save-interval", 20000, "--eval-interval", 40000,
           "--eval-iters", 1, "--wandb-project", "EE-TUNE", "--wandb-group", "llama-2-70B-chat-8-EXIT-pt",
           "--wandb-exp-name", "1128-1200", "--load", "/m/checkpoints/llama2-8-exit", "--save", "/m/EE-TUNE"]
    return [str(x) for x in gpt + data + out]


# (name, argv, world size, expected (tp, pp, dp, microbatches), ffn)
FULL_SIZE = [
    ("1-3B", training_script(1, 4, 24, 2048, 32, 4, 72000, [7, 13], [0.25, 0.5], False), 16, (1, 4, 4, 128), 5440),
    ("7B", training_script(1, 4, 32, 4096, 32, 2, 192000, [9, 17], [0.1, 0.2], True), 16, (1, 4, 4, 256), 10880),
    ("13B", training_script(2, 4, 40, 5120, 40, 1, 192000, [11, 21], [0.1, 0.2], True), 16, (2, 4, 2, 1024), 13632),
    ("30B", training_script(4, 4, 60, 6656, 52, 1, 192000, [16, 31], [0.1, 0.2], True), 16, (4, 4, 1, 2048), 17728),
]
TUNING = [
    ("13B_8", tuning_script(40, 5120, 40, 13824, range(5, 41, 5), 4, ["--query-key-layer-scaling"]), 8, 2),
    ("13B_1", tuning_script(40, 5120, 40, 13824, [10], 4, ["--query-key-layer-scaling"]), 4, 1),
    ("70B_8", tuning_script(80, 8192, 64, 28672, range(10, 81, 10), 4,
                            ["--sequence-parallel", "--group-query-attention", "--num-query-groups", 8]), 8, 2),
    ("70B_1", tuning_script(80, 8192, 64, 28672, [20], 1,
                            ["--sequence-parallel", "--group-query-attention", "--num-query-groups", 8]), 4, 4),
]


def shrink(argv, **sizes):
    """Replace the values of size flags (``num_layers=8`` -> ``--num-layers 8``), keeping everything else."""
    out = list(argv)
    for dest, value in sizes.items():
        flag = "--" + dest.replace("_", "-")
        i = out.index(flag)
        if isinstance(value, (list, tuple)):
            j = i + 1
            while j < len(out) and not out[j].startswith("--"):
                j += 1
            out[i + 1:j] = [str(v) for v in value]
        else:
            out[i + 1] = str(value)
    return out


@pytest.mark.parametrize("name,argv,world,expect,ffn", FULL_SIZE, ids=[c[0] for c in FULL_SIZE])
def test_training_scripts_validate_unchanged(name, argv, world, expect, ffn):
    args = parse_args(argv)
    run = resolve(args, world, vocab_size=32000)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.data_parallel_size,
            args.num_microbatches) == expect
    assert args.ffn_hidden_size == ffn  # int(8h/3/64)*64, as EE-LLM's scripts get it with --swiglu
    assert args.params_dtype == torch.bfloat16 and args.accumulate_allreduce_grads_in_fp32
    assert args.add_position_embedding is False and not args.add_bias_linear
    assert args.sequence_parallel == (args.tensor_model_parallel_size > 1)
    assert args.pre_exit and args.exit_layer_temperature == [1.0, 1.0] and args.exit_layer_weight_init == [0.0, 0.0]
    assert run.partition().exit_stages == [1, 2]  # the first layer of stages 1 and 2 (pre-exits, as EE-LLM's)
    assert run.logging.wandb_project == "EE-LLM" and run.logging.log_timers_to_tracker
    assert run.data.data_path == DATA[1:5] and run.checkpoint.save == run.checkpoint.load == "/ckpt/EE-LLM"


@pytest.mark.parametrize("name,argv,world,dp", TUNING, ids=[c[0] for c in TUNING])
def test_tuning_scripts_validate_unchanged(name, argv, world, dp):
    args = parse_args(argv)
    run = resolve(args, world, vocab_size=32000)
    assert run.parallel.dp == dp and run.parallel.pp == 4
    assert run.parallel.stages == args.tune_exit_pipeline_parallel_size
    assert run.training.tune_exit and run.checkpoint.finetune
    assert run.early_exit.use_exit_mlp and run.early_exit.use_exit_norm and run.early_exit.untie_exit_output_weights
    assert run.model.padded_vocab(1) == 32000
    assert run.optimizer.adam_eps == 1e-5 and run.optimizer.lr_warmup_fraction == 0.01
    if name.startswith("13B"):
        assert run.model.apply_query_key_layer_scaling and run.model.num_query_groups is None
    else:
        assert run.model.num_query_groups == 8 and not run.model.sequence_parallel  # tp = 1


def test_shrunk_scripts_validate():
    """The sizes shrunk for CPU (as the end-to-end tests run them) still pass the whole validation."""
    small = dict(num_layers=8, hidden_size=64, num_attention_heads=4, seq_length=32, max_position_embeddings=32,
                 global_batch_size=16)
    argv = shrink(FULL_SIZE[0][1], exit_layer_nums=[3, 5], tensor_model_parallel_size=2,
                  pipeline_model_parallel_size=2, micro_batch_size=2, **small)
    args = parse_args(argv)
    resolve(args, 4, vocab_size=1000)
    assert (args.data_parallel_size, args.num_microbatches, args.ffn_hidden_size) == (1, 8, 128)
    assert args.sequence_parallel
    tune = shrink(TUNING[2][1], exit_layer_nums=[1, 2, 3, 4, 5, 6, 7, 8], num_query_groups=2, ffn_hidden_size=96,
                  **small)
    run = resolve(parse_args(tune), 8, vocab_size=1000)
    assert run.model.num_query_groups == 2 and run.parallel.dp == 2 and run.partition().exit_stages == [0, 1, 2, 3]


BASE = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--lr", "1e-3", "--train-iters", "10", "--mock-data", "--vocab-size", "100"]


def test_megatron_and_ee_llm_defaults():
    args = parse_args(BASE)
    assert args.micro_batch_size == 1 and args.global_batch_size is None  # EE-LLM: micro batch default 1
    assert args.apply_query_key_layer_scaling is False  # EE-LLM flipped the default
    assert args.wandb_project is None and args.wandb_group is None and args.wandb_exp_name == "default"
    assert args.exit_layer_nums == [] and args.backward_forward_ratio == 2.0 and args.load_iteration == 0
    assert args.tracker_log_interval == 1 and args.log_learning_rate_to_tracker and args.log_loss_scale_to_tracker
    assert (args.attention_dropout, args.hidden_dropout, args.weight_decay, args.adam_eps) == (0.1, 0.1, 0.01, 1e-8)
    assert (args.initial_loss_scale, args.loss_scale_window, args.hysteresis) == (2.0**32, 1000, 2)
    assert args.split == "969, 30, 1" and args.eval_interval == 1000 and args.eval_iters == 100
    resolve(args, 2)
    assert args.global_batch_size == 2 and args.num_microbatches == 1
    assert args.ffn_hidden_size == 128 and args.kv_channels == 8 and args.max_position_embeddings == 16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert args.params_dtype == torch.float32 and args.device == device
    assert args.distributed_backend == {"cpu": "gloo", "cuda": "nccl"}[device]
    assert args.num_fill_warmup_microbatches is None and args.tune_exit_pipeline_parallel_size is None


@pytest.mark.parametrize("flags,expected", [
    (["--query-key-layer-scaling"], True), (["--apply-query-key-layer-scaling"], True),
    (["--no-query-key-layer-scaling"], False), ([], False),
])
def test_query_key_layer_scaling_spellings(flags, expected):
    assert parse_args(BASE + flags).apply_query_key_layer_scaling is expected


def test_tracker_and_tensorboard_spellings_share_a_dest():
    ee = parse_args(BASE + ["--tracker-log-interval", "5", "--log-timers-to-tracker", "--log-memory-to-tracker",
                            "--no-log-learnig-rate-to-tracker", "--no-log-loss-scale-to-tracker"])
    up = parse_args(BASE + ["--tensorboard-log-interval", "5", "--log-timers-to-tensorboard",
                            "--log-memory-to-tensorboard", "--no-log-learnig-rate-to-tensorboard",
                            "--no-log-loss-scale-to-tensorboard"])
    assert vars(ee) == vars(up)
    assert ee.tracker_log_interval == 5 and ee.log_timers_to_tracker and not ee.log_learning_rate_to_tracker


def test_fill_counts_follow_rule_3(caplog):
    ee = ["--pipeline-model-parallel-size", "4", "--exit-layer-nums", "1", "--fill-explicit-bubbles"]
    args = parse_args(BASE + ee)
    resolve(args, 4)
    assert (args.num_fill_warmup_microbatches, args.num_fill_cooldown_microbatches) == (2, 2)  # int(3*2/3)
    args = parse_args(BASE + ee + ["--backward-forward-ratio", "1", "--num-fill-warmup-microbatches", "0",
                                   "--num-fill-cooldown-microbatches", "5"])
    run = resolve(args, 4)
    assert (args.num_fill_warmup_microbatches, args.num_fill_cooldown_microbatches) == (0, 1)  # int(3*1/2) = 1
    assert "--num-fill-cooldown-microbatches 5" in caplog.text
    assert (run.training.num_fill_warmup_microbatches, run.training.num_fill_cooldown_microbatches) == (0, 1)


def test_derived_parallel_values(caplog):
    caplog.set_level(logging.INFO, logger="megatron.arguments")
    args = parse_args(BASE + ["--num-layers", "8", "--pipeline-model-parallel-size", "2",
                              "--num-layers-per-virtual-pipeline-stage", "2", "--sequence-parallel",
                              "--global-batch-size", "12", "--micro-batch-size", "2"])
    resolve(args, 6)
    assert (args.data_parallel_size, args.virtual_pipeline_model_parallel_size, args.num_microbatches) == (3, 2, 2)
    assert not args.sequence_parallel and "--sequence-parallel has no effect" in caplog.text
    uneven = resolve(parse_args(BASE + ["--num-layers", "6", "--pipeline-model-parallel-size", "2",
                                        "--layers-per-stage", "4", "2"]), 2)
    assert uneven.partition().layers_per_stage == (4, 2)


def test_megatron_clamps_parallel_sizes_to_a_small_world(caplog):
    args = parse_args(BASE + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "4"])
    resolve(args, 4)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.data_parallel_size) == (2, 2, 1)
    assert "Megatron's clamp" in caplog.text


def test_ignored_flags_are_accepted_with_one_info_line(caplog):
    caplog.set_level(logging.INFO, logger="megatron.arguments")
    flags = ["--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-gradient-accumulation-fusion",
             "--empty-unused-memory-level", "1", "--data-impl", "mmap", "--transformer-impl", "transformer_engine"]
    resolve(parse_args(BASE + flags), 1)
    lines = [r.getMessage() for r in caplog.records if "no effect here" in r.getMessage()]
    assert len(lines) == 1
    for flag in ("--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-gradient-accumulation-fusion",
                 "--empty-unused-memory-level", "--transformer-impl"):
        assert flag in lines[0]
    assert "--data-impl" not in lines[0]  # left at its default
    assert all(name.startswith("--") for name, _, _ in IGNORED_FLAGS.values())


def test_validate_is_idempotent_and_rope_drops_position_table():
    args = parse_args(BASE + ["--use-rotary-position-embeddings", "--exit-layer-nums", "2"])
    run = resolve(args, 1)
    first = dict(vars(args))
    assert args.position_embedding_type == "rope" and args.add_position_embedding is False
    assert resolve(args, 1) == run and vars(args) == first


def test_args_to_configs_round_trip():
    argv = BASE + ["--exit-layer-nums", "1", "3", "--exit-layer-weight", "0.3", "0.5", "--use-exit-mlp",
                   "--use-exit-block", "--group-query-attention", "--num-query-groups", "2", "--bf16",
                   "--pipeline-model-parallel-size", "2", "--layers-per-stage", "3", "1", "--save", "/c",
                   "--save-interval", "5", "--tensorboard-dir", "/tb", "--fill-explicit-bubbles", "--swiglu"]
    args = parse_args(argv)
    run = resolve(args, 4)
    for section in (run.model, run.early_exit, run.optimizer, run.training, run.data, run.checkpoint, run.logging):
        for f in dataclasses.fields(section):
            if f.name not in ("num_query_groups",):
                assert getattr(section, f.name) == getattr(args, f.name), f.name
    assert isinstance(run.model, ModelConfig) and isinstance(run.early_exit, EarlyExitConfig)
    assert isinstance(run.optimizer, OptimizerConfig) and run.model.num_query_groups == 2
    assert run.parallel.dims.dp == 2 and run.parallel.layers_per_stage == [3, 1]
    assert run.early_exit.use_exit_mlp and run.early_exit.use_exit_block  # allowed together (issue 3)
    assert RunConfig.from_args(run.to_args()) == run
    interleaved = BASE + ["--num-layers", "8", "--pipeline-model-parallel-size", "2",
                          "--num-layers-per-virtual-pipeline-stage", "2"]
    saved = resolve(parse_args(interleaved), 2).to_args()
    assert saved.num_layers_per_virtual_pipeline_stage == 2 and saved.virtual_pipeline_model_parallel_size == 2
    args.exit_layer_nums.append(4)
    assert run.early_exit.exit_layer_nums == [1, 3]  # copied, not shared



def test_extra_args_provider_and_help():
    def extra(parser):
        parser.add_argument_group(title="server").add_argument("--port", type=int, default=5000)
        return parser

    args = parse_args(BASE + ["--port", "8080", "--use-flash-attn"], extra_args_provider=extra)
    assert args.port == 8080 and resolve(args, 1).model.use_flash_attn
    with pytest.raises(SystemExit) as done:
        parse_args(["--help"])  # every help string renders (argparse %-formats them)
    assert done.value.code == 0
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--no-such-flag"])
    assert parse_args(BASE + ["--no-such-flag"], ignore_unknown_args=True).num_layers == 4
