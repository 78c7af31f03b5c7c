"""Megatron / EE-LLM compatible command line: flags, derived values and whole-run validation.

``parse_args`` accepts Megatron's and EE-LLM's flag names, defaults and argument groups, so the launch
scripts of EE-LLM (``examples/ee_training/*.sh``, ``examples/ee_tuning/tune/*.sh``) parse unchanged.
``resolve(args, world_size)`` is the one configuration step: it derives on ``args`` what Megatron
derives (dp, virtual pipeline size, ffn size, kv channels, params dtype, microbatches, early-exit
default lists, bubble-fill counts) -- ``args`` stays the Megatron-named record that checkpoints store
-- and returns the typed, validated :class:`~megatron.run_config.RunConfig` that training, the server,
evaluation and the tools take. Validation runs once, before any process group exists, and raises
:class:`~megatron.errors.ConfigError` with the flag and the fix. Each rule has one home: a section's
``validate`` (or, for the bubble-fill counts, ``schedules.fill_counts``); this module only derives
defaults and owns the rules about flags as spelled (refused, deprecated, ignored).

Kernel-selection flags of Megatron's GPU build (fusions, async all-reduce ...) are accepted and
ignored with one info line; flags of features we do not implement are refused when set.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings

import torch

from megatron.config import EarlyExitConfig
from megatron.core.pipeline_parallel.schedules import ScheduleError, fill_counts
from megatron.errors import ConfigError
from megatron.run_config import RunConfig
from megatron.tokenizer import add_tokenizer_args

__all__ = ["build_parser", "parse_args", "resolve", "IGNORED_FLAGS", "REFUSED_FLAGS"]

log = logging.getLogger(__name__)

# dest -> (flag, default, value choices): kernel / performance switches of Megatron's GPU build with no
# effect here (PyTorch picks the kernels); accepted so that scripts run, and named in one info line.
IGNORED_FLAGS = {
    "masked_softmax_fusion": ("--no-masked-softmax-fusion", True, None),
    "bias_gelu_fusion": ("--no-bias-gelu-fusion", True, None),
    "bias_dropout_fusion": ("--no-bias-dropout-fusion", True, None),
    "gradient_accumulation_fusion": ("--no-gradient-accumulation-fusion", True, None),
    "async_tensor_model_parallel_allreduce": ("--no-async-tensor-model-parallel-allreduce", True, None),
    "no_persist_layer_norm": ("--no-persist-layer-norm", False, None),
    "attention_softmax_in_fp32": ("--attention-softmax-in-fp32", False, None),
    "overlap_p2p_comm": ("--overlap-p2p-communication", False, None),
    "scatter_gather_tensors_in_pipeline": ("--no-scatter-gather-tensors-in-pipeline", True, None),
    "use_ring_exchange_p2p": ("--use-ring-exchange-p2p", False, None),
    "delay_grad_reduce": ("--no-delay-grad-reduce", True, None),
    "distribute_saved_activations": ("--distribute-saved-activations", False, None),
    "empty_unused_memory_level": ("--empty-unused-memory-level", 0, (0, 1, 2)),
    "transformer_impl": ("--transformer-impl", "local", ("local", "transformer_engine")),
    "use_mcore_models": ("--use-mcore-models", False, None),
    "mmap_warmup": ("--mmap-warmup", False, None),
    "data_impl": ("--data-impl", "mmap", ("mmap", "infer", "lazy", "cached")),
    "barrier_with_L1_time": ("--no-barrier-with-level-1-timing", True, None),
}

# dest -> (flag, value kwargs, what to do): accepted by the parser so that the message is ours, refused
# when set (features not implemented, and Megatron's removed spellings).
_VALUE = {"type": int}
REFUSED_FLAGS = {
    "standalone_embedding_stage": ("--standalone-embedding-stage", None,
                                   "give the first stage fewer layers with --layers-per-stage instead"),
    "apply_layernorm_1p": ("--apply-layernorm-1p", None, "zero-centred LayerNorm is not implemented"),
    "apply_residual_connection_post_layernorm": ("--apply-residual-connection-post-layernorm", None,
                                                 "only the pre-norm GPT residual is implemented"),
    "openai_gelu": ("--openai-gelu", None, "the tanh GELU is not implemented; drop it (exact GELU) or use --swiglu"),
    "squared_relu": ("--squared-relu", None, "not implemented; use GELU (default) or --swiglu"),
    "fp32_residual_connection": ("--fp32-residual-connection", None, "not implemented"),
    "init_method_xavier_uniform": ("--init-method-xavier-uniform", None, "use --init-method-std"),
    "num_experts": ("--num-experts", _VALUE, "mixture-of-experts is not implemented"),
    "rampup_batch_size": ("--rampup-batch-size", {"nargs": "*"}, "batch-size ramp-up is not implemented"),
    "fp8": ("--fp8-format", {"choices": ["e4m3", "hybrid"]}, "FP8 training is not implemented; use --bf16"),
    "rotary_seq_len_interpolation_factor": ("--rotary-seq-len-interpolation-factor", _VALUE, "not implemented"),
    "retro_add_retriever": ("--retro-add-retriever", None, "Retro is not implemented"),
    "batch_size": ("--batch-size", _VALUE, "renamed: use --micro-batch-size"),
    "warmup": ("--warmup", _VALUE, "renamed: use --lr-warmup-fraction or --lr-warmup-iters"),
    "model_parallel_size": ("--model-parallel-size", _VALUE, "renamed: use --tensor-model-parallel-size"),
    "checkpoint_activations": ("--checkpoint-activations", None, "renamed: use --recompute-activations or "
                               "--recompute-granularity full --recompute-method uniform"),
}


def _flag(group, *names, **kw):
    group.add_argument(*names, **kw)


def _add_ignored(group, *dests):
    for dest in dests:
        name, default, choices = IGNORED_FLAGS[dest]
        if choices is None:
            _flag(group, name, action="store_false" if default else "store_true", dest=dest, help="Ignored.")
        else:
            _flag(group, name, type=type(default), default=default, choices=choices, dest=dest, help="Ignored.")


def _add_refused(group, *dests):
    for dest in dests:
        name, kwargs, fix = REFUSED_FLAGS[dest]
        kwargs = kwargs or {"action": "store_true"}
        _flag(group, name, dest=dest, default=None, help=f"Not supported: {fix}.", **kwargs)


def _add_network_size_args(parser):
    g = parser.add_argument_group(title="network size")
    _flag(g, "--num-layers", type=int, default=None, help="Number of transformer layers.")
    _flag(g, "--hidden-size", type=int, default=None, help="Transformer hidden size.")
    _flag(g, "--ffn-hidden-size", type=int, default=None, help="MLP size (default 4h, int(8h/3/64)*64 with swiglu).")
    _flag(g, "--num-attention-heads", type=int, default=None, help="Number of attention heads.")
    _flag(g, "--kv-channels", type=int, default=None, help="Head dimension (default hidden / heads).")
    _flag(g, "--group-query-attention", action="store_true", help="Use grouped-query attention.")
    _flag(g, "--num-query-groups", type=int, default=1, help="Key/value groups with --group-query-attention.")
    _flag(g, "--max-position-embeddings", type=int, default=None, help="Positions (default --seq-length).")
    _flag(g, "--position-embedding-type", default="learned_absolute", choices=["learned_absolute", "rope"])
    _flag(g, "--use-rotary-position-embeddings", action="store_true", help="Deprecated: --position-embedding-type rope.")
    _flag(g, "--rotary-percent", type=float, default=1.0, help="Fraction of the head dimension that is rotated.")
    _flag(g, "--rotary-base", type=int, default=10000, help="RoPE base.")
    _flag(g, "--no-position-embedding", action="store_false", dest="add_position_embedding",
          help="Deprecated: use --position-embedding-type rope.")
    _flag(g, "--normalization", default="LayerNorm", choices=["LayerNorm", "RMSNorm"])
    _flag(g, "--norm-epsilon", type=float, default=1e-5, help="Epsilon of LayerNorm / RMSNorm.")
    _flag(g, "--swiglu", action="store_true", help="SwiGLU MLP instead of GELU.")
    _flag(g, "--untie-embeddings-and-output-weights", action="store_true", help="Separate output layer.")
    _flag(g, "--disable-bias-linear", action="store_false", dest="add_bias_linear", help="No linear-layer biases.")
    _add_refused(g, "apply_layernorm_1p", "apply_residual_connection_post_layernorm", "openai_gelu", "squared_relu",
                 "num_experts", "rotary_seq_len_interpolation_factor")
    _add_ignored(g, "transformer_impl", "use_mcore_models")


def _add_regularization_args(parser):
    g = parser.add_argument_group(title="regularization")
    _flag(g, "--attention-dropout", type=float, default=0.1, help="Attention-probability dropout.")
    _flag(g, "--hidden-dropout", type=float, default=0.1, help="Hidden-state dropout.")
    _flag(g, "--weight-decay", type=float, default=0.01, help="Weight decay (decoupled, as AdamW).")
    _flag(g, "--start-weight-decay", type=float, default=None, help="Weight decay at the start of the increment.")
    _flag(g, "--end-weight-decay", type=float, default=None, help="Weight decay at the end of the increment.")
    _flag(g, "--weight-decay-incr-style", default="constant", choices=["constant", "linear", "cosine"])
    _flag(g, "--clip-grad", type=float, default=1.0, help="Clip the global gradient L2 norm (0: off).")
    _flag(g, "--adam-beta1", type=float, default=0.9)
    _flag(g, "--adam-beta2", type=float, default=0.999)
    _flag(g, "--adam-eps", type=float, default=1e-8)
    _flag(g, "--sgd-momentum", type=float, default=0.9)


def _add_training_args(parser):
    g = parser.add_argument_group(title="training")
    _flag(g, "--micro-batch-size", type=int, default=1, help="Samples per microbatch (EE-LLM default 1).")
    _flag(g, "--global-batch-size", type=int, default=None, help="Samples per iteration (default micro x dp).")
    _add_refused(g, "rampup_batch_size", "batch_size", "checkpoint_activations")
    _flag(g, "--recompute-activations", action="store_true", help="Same as --recompute-granularity selective.")
    _flag(g, "--recompute-granularity", default=None, choices=["full", "selective"])
    _flag(g, "--recompute-method", default=None, choices=["uniform", "block"])
    _flag(g, "--recompute-num-layers", type=int, default=None)
    _flag(g, "--train-iters", type=int, default=None, help="Iterations to train (or --train-samples).")
    _flag(g, "--train-samples", type=int, default=None, help="Samples to train (or --train-iters).")
    _flag(g, "--log-interval", type=int, default=100, help="Iterations between console log lines.")
    _flag(g, "--exit-interval", type=int, default=None, help="Save and exit when the iteration divides by this.")
    _flag(g, "--exit-duration-in-mins", type=int, default=None, help="Save and exit after this many minutes.")
    _flag(g, "--exit-signal-handler", action="store_true", help="On SIGTERM: save a checkpoint, then exit.")
    _flag(g, "--tensorboard-dir", default=None, help="Write TensorBoard logs here.")
    _flag(g, "--use-flash-attn", action="store_true", help="FlashAttention when installed, else PyTorch SDPA.")
    _flag(g, "--optimizer", default="adam", choices=["adam", "sgd"])
    _flag(g, "--dataloader-type", default=None, choices=["single", "cyclic"])
    _flag(g, "--sequence-parallel", action="store_true", help="Split norms / dropout over tp along the sequence.")
    _flag(g, "--no-check-for-nan-in-loss-and-grad", action="store_false", dest="check_for_nan_in_loss_and_grad")
    _flag(g, "--skip-train", action="store_true", help="Only evaluate.")
    _add_ignored(g, "masked_softmax_fusion", "bias_gelu_fusion", "bias_dropout_fusion",
                 "gradient_accumulation_fusion", "async_tensor_model_parallel_allreduce", "no_persist_layer_norm",
                 "distribute_saved_activations")


def _add_initialization_args(parser):
    g = parser.add_argument_group(title="initialization")
    _flag(g, "--seed", type=int, default=1234, help="Seed of initialisation, dropout and data.")
    _flag(g, "--data-parallel-random-init", action="store_true")
    _flag(g, "--init-method-std", type=float, default=0.02, help="Std of the normal weight initialisation.")
    _flag(g, "--use-cpu-initialization", action="store_true",
          help="Draw the initial weights on the CPU: the same weights as a CPU run (slower on GPUs).")
    _add_refused(g, "init_method_xavier_uniform")


def _add_learning_rate_args(parser):
    g = parser.add_argument_group(title="learning rate")
    _flag(g, "--lr", type=float, default=None, help="Peak learning rate.")
    _flag(g, "--lr-decay-style", default="linear", choices=["constant", "linear", "cosine", "inverse-square-root"])
    _flag(g, "--lr-decay-iters", type=int, default=None, help="Decay length (default --train-iters).")
    _flag(g, "--lr-decay-samples", type=int, default=None, help="Decay length (default --train-samples).")
    _flag(g, "--lr-warmup-fraction", type=float, default=None, help="Warm-up as a fraction of the decay length.")
    _flag(g, "--lr-warmup-iters", type=int, default=0)
    _flag(g, "--lr-warmup-samples", type=int, default=0)
    _flag(g, "--lr-warmup-init", type=float, default=0.0)
    _add_refused(g, "warmup")
    _flag(g, "--min-lr", type=float, default=0.0)
    _flag(g, "--override-opt_param-scheduler", "--override-opt-param-scheduler", action="store_true",
          dest="override_opt_param_scheduler")
    _flag(g, "--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler", action="store_true",
          dest="use_checkpoint_opt_param_scheduler")


def _add_checkpointing_args(parser):
    g = parser.add_argument_group(title="checkpointing")
    _flag(g, "--save", default=None, help="Directory to save checkpoints to.")
    _flag(g, "--save-interval", type=int, default=None, help="Iterations between saves.")
    _flag(g, "--no-save-optim", action="store_true", default=None)
    _flag(g, "--no-save-rng", action="store_true", default=None)
    _flag(g, "--load", default=None, help="Directory to load a checkpoint from.")
    _flag(g, "--no-load-optim", action="store_true", default=None)
    _flag(g, "--no-load-rng", action="store_true", default=None)
    _flag(g, "--load-iteration", type=int, default=0, help="Load iter_N (0: the tracker file's latest).")
    _flag(g, "--finetune", action="store_true", help="Load the model only; iteration restarts at 0.")
    _flag(g, "--no-initialization", action="store_false", dest="perform_initialization")
    _flag(g, "--use-checkpoint-args", action="store_true", help="Take model flags from the checkpoint.")
    _flag(g, "--exit-on-missing-checkpoint", action="store_true", help="Fail if --load holds no checkpoint.")


def _add_mixed_precision_args(parser):
    g = parser.add_argument_group(title="mixed precision")
    _flag(g, "--fp16", action="store_true", help="fp16 parameters, fp32 master weights, loss scaling.")
    _flag(g, "--bf16", action="store_true", help="bf16 parameters, fp32 master weights.")
    _flag(g, "--loss-scale", type=float, default=None, help="Static loss scale (default: dynamic for fp16).")
    _flag(g, "--initial-loss-scale", type=float, default=2.0**32)
    _flag(g, "--min-loss-scale", type=float, default=1.0)
    _flag(g, "--loss-scale-window", type=float, default=1000)
    _flag(g, "--hysteresis", type=int, default=2)
    _add_refused(g, "fp32_residual_connection", "fp8")
    # EE-LLM's --query-key-layer-scaling (default off) and upstream's two spellings share one dest.
    _flag(g, "--query-key-layer-scaling", "--apply-query-key-layer-scaling", action="store_true", default=False,
          dest="apply_query_key_layer_scaling", help="Scale Q.K^T by 1/layer (no numeric effect with SDPA).")
    _flag(g, "--no-query-key-layer-scaling", action="store_false", default=False,
          dest="apply_query_key_layer_scaling")
    _add_ignored(g, "attention_softmax_in_fp32")
    _flag(g, "--accumulate-allreduce-grads-in-fp32", action="store_true")
    _flag(g, "--fp16-lm-cross-entropy", action="store_true")


def _add_distributed_args(parser):
    g = parser.add_argument_group(title="distributed")
    _flag(g, "--tensor-model-parallel-size", type=int, default=1)
    _flag(g, "--pipeline-model-parallel-size", type=int, default=1)
    _add_refused(g, "model_parallel_size", "standalone_embedding_stage")
    _flag(g, "--num-layers-per-virtual-pipeline-stage", type=int, default=None, help="Interleaved 1F1B chunk size.")
    _flag(g, "--layers-per-stage", type=int, nargs="+", default=None,
          help="Explicit (uneven) transformer layers per pipeline stage, one count per stage.")
    _flag(g, "--distributed-backend", default=None, choices=["nccl", "gloo"], help="Default: follows --device.")
    _flag(g, "--device", default=None, choices=["cpu", "cuda"], help="Default: cuda when available, else cpu.")
    _flag(g, "--distributed-timeout-minutes", type=int, default=10)
    _flag(g, "--overlap-grad-reduce", action="store_true", help="Overlap dp gradient reduction with backward.")
    _flag(g, "--use-distributed-optimizer", action="store_true", help="Shard optimizer state over dp.")
    _flag(g, "--local_rank", "--local-rank", type=int, default=None, help="Set by older launchers; unused.")
    _add_ignored(g, "overlap_p2p_comm", "scatter_gather_tensors_in_pipeline", "use_ring_exchange_p2p",
                 "delay_grad_reduce", "empty_unused_memory_level")


def _add_validation_args(parser):
    g = parser.add_argument_group(title="validation")
    _flag(g, "--eval-iters", type=int, default=100, help="Batches per evaluation.")
    _flag(g, "--eval-interval", type=int, default=1000, help="Iterations between evaluations.")


def _add_data_args(parser):
    g = parser.add_argument_group(title="data and dataloader")
    _flag(g, "--data-path", nargs="*", default=None, help="PREFIX, or W1 PREFIX1 W2 PREFIX2 ... (blend).")
    _flag(g, "--split", default="969, 30, 1", help="Train, valid, test proportions, e.g. 990,9,1.")
    for name in ("--train-data-path", "--valid-data-path", "--test-data-path"):
        _flag(g, name, nargs="*", default=None)
    _flag(g, "--data-cache-path", default=None, help="Directory for the dataset index cache.")
    _flag(g, "--mock-data", action="store_true", help="Synthetic tokens instead of datasets.")
    _add_ignored(g, "data_impl", "mmap_warmup")
    _flag(g, "--seq-length", type=int, default=None, help="Tokens per sample.")
    _flag(g, "--num-workers", type=int, default=2, help="Data-loader worker processes.")
    _flag(g, "--reset-position-ids", action="store_true", help="Restart positions after end-of-document.")
    _flag(g, "--reset-attention-mask", action="store_true", help="Do not attend across documents.")
    _flag(g, "--eod-mask-loss", action="store_true", help="No loss on end-of-document tokens.")
    _add_refused(g, "retro_add_retriever")


def _add_logging_args(parser):
    g = parser.add_argument_group(title="logging")
    _flag(g, "--log-params-norm", action="store_true")
    _flag(g, "--log-num-zeros-in-grad", action="store_true")
    _flag(g, "--timing-log-level", type=int, default=0, choices=range(0, 3))
    _flag(g, "--timing-log-option", default="minmax", choices=["max", "minmax", "all"])
    _add_ignored(g, "barrier_with_L1_time")
    _flag(g, "--tensorboard-queue-size", type=int, default=1000)
    # EE-LLM renamed the *-tensorboard flags to *-to-tracker (TensorBoard and W&B); both spellings work.
    _flag(g, "--tracker-log-interval", "--tensorboard-log-interval", type=int, default=1)
    for what in ("timers", "batch-size", "validation-ppl", "memory", "world-size"):
        dest = f"log_{what.replace('-', '_')}_to_tracker"
        _flag(g, f"--log-{what}-to-tracker", f"--log-{what}-to-tensorboard", action="store_true", dest=dest)
    _flag(g, "--no-log-learnig-rate-to-tracker", "--no-log-learning-rate-to-tracker",
          "--no-log-learnig-rate-to-tensorboard", "--no-log-learning-rate-to-tensorboard", action="store_false",
          dest="log_learning_rate_to_tracker")
    _flag(g, "--no-log-loss-scale-to-tracker", "--no-log-loss-scale-to-tensorboard", action="store_false",
          dest="log_loss_scale_to_tracker")
    _flag(g, "--wandb-project", default=None, help="W&B project (None: W&B off).")
    _flag(g, "--wandb-group", default=None)
    _flag(g, "--wandb-exp-name", default="default")
    _flag(g, "--wandb-save-dir", default="")


def _add_early_exit_args(parser):
    g = parser.add_argument_group(title="multexit")
    _flag(g, "--exit-layer-nums", type=int, nargs="+", default=[], help="Layers with an exit, from 1.")
    _flag(g, "--exit-layer-weight", type=float, nargs="+", default=[], help="Loss weight per exit (default 1.0).")
    _flag(g, "--exit-layer-weight-init", type=float, nargs="+", default=[], help="Warm-up start weights (0.0).")
    _flag(g, "--exit-layer-weight-warmup-iters", type=int, default=0)
    _flag(g, "--exit-layer-weight-warmup-style", default="linear", choices=["linear", "cosine"])
    _flag(g, "--exit-layer-temperature", type=float, nargs="+", default=[], help="Training logit temperature.")
    _flag(g, "--use-exit-norm", action="store_true", help="Norm before each exit's output projection.")
    _flag(g, "--use-exit-mlp", action="store_true", help="A branch MLP in each exit layer.")
    _flag(g, "--use-exit-block", action="store_true", help="A transformer layer in each exit.")
    _flag(g, "--untie-exit-output-weights", action="store_true", help="One output projection per exit.")
    _flag(g, "--pre-exit", action="store_true", help="Exit from the input of its layer instead of the output.")
    _flag(g, "--fill-explicit-bubbles", action="store_true", help="Fill pipeline bubbles with exit work.")
    _flag(g, "--num-fill-warmup-microbatches", type=int, default=None)
    _flag(g, "--num-fill-cooldown-microbatches", type=int, default=None)
    _flag(g, "--backward-forward-ratio", type=float, default=2.0, help="Backward / forward time (fill counts).")
    _flag(g, "--use-dynamic-exit-layer-weight", action="store_true", help="Weight exit tokens by confidence.")
    _flag(g, "--tune-exit", action="store_true", help="EE-Tuning: train only the exits.")
    _flag(g, "--tune-exit-pipeline-parallel-size", type=int, default=None,
          help="EE-Tuning: build, load and run only the first N stages (default 1, as EE-LLM); every exit must "
               "lie in them.")
    g = parser.add_argument_group(title="early exit (ours)")
    _flag(g, "--use-exit-linear", action="store_true",
          help="A zero-initialised h + W h + b in each exit, after the exit block and before the exit norm.")
    _flag(g, "--exit-estimator", action="store_true",
          help="Per exit, a small MLP on the trunk state predicting agreement with the final head (trained "
               "under --tune-exit).")
    _flag(g, "--exit-estimator-hidden", type=int, default=64, help="The estimator's hidden width.")
    _flag(g, "--exit-estimator-loss-weight", type=float, default=1.0, help="Weight of the estimator's loss.")
    _flag(g, "--exit-vocab-size", type=int, default=0,
          help="K > 0: an exit_vocab buffer of K token ids for reduced-vocabulary exits (filled by "
               "tools/checkpoint/checkpoint_converter.py --conversion-type exit-vocab).")
    _flag(g, "--exit-distillation-weight", type=float, default=0.0,
          help="w in [0, 1]: exit loss = (1 - w) CE(labels) + w CE against the final head's top-k (--tune-exit).")
    _flag(g, "--exit-distillation-top-k", type=int, default=64, help="Final-head tokens kept for distillation.")
    _flag(g, "--exit-distillation-temperature", type=float, default=1.0, help="Distillation temperature.")


def build_parser(extra_args_provider=None) -> argparse.ArgumentParser:
    """The full Megatron / EE-LLM parser; ``extra_args_provider(parser)`` may add and return more."""
    parser = argparse.ArgumentParser(description="EE-Megatron arguments", allow_abbrev=False)
    for add in (_add_network_size_args, _add_regularization_args, _add_training_args, _add_initialization_args,
                _add_learning_rate_args, _add_checkpointing_args, _add_mixed_precision_args,
                _add_distributed_args, _add_validation_args, _add_data_args, _add_logging_args,
                _add_early_exit_args):
        add(parser)
    add_tokenizer_args(parser)
    if extra_args_provider is not None:
        parser = extra_args_provider(parser) or parser
    return parser


def parse_args(argv=None, extra_args_provider=None, ignore_unknown_args: bool = False) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``); ``rank`` / ``world_size`` come from torchrun's env."""
    parser = build_parser(extra_args_provider)
    if ignore_unknown_args:
        args, _ = parser.parse_known_args(argv)
    else:
        args = parser.parse_args(argv)
    args.rank = int(os.getenv("RANK", "0"))
    args.world_size = int(os.getenv("WORLD_SIZE", "1"))
    return args


# --------------------------------------------------------------------------------------------- validation
def _info(args, message: str, level: int = logging.INFO) -> None:
    if getattr(args, "rank", 0) == 0:  # one line per job, not per rank
        log.log(level, message)


def _normalize(args) -> None:
    """Refuse unsupported flags, report ignored ones, map legacy spellings, make store_true/None bools."""
    for dest, (flag, _, fix) in REFUSED_FLAGS.items():
        if getattr(args, dest, None) not in (None, False):
            raise ConfigError(f"{flag} is not supported: {fix}")
    ignored = [name for dest, (name, default, _) in IGNORED_FLAGS.items() if getattr(args, dest, default) != default]
    if ignored:
        _info(args, f"accepted for compatibility, no effect here (PyTorch picks the kernels): {', '.join(ignored)}")
    if args.use_rotary_position_embeddings:
        args.position_embedding_type = "rope"
    if not args.add_position_embedding and args.position_embedding_type != "rope":
        raise ConfigError("--no-position-embedding is deprecated: use --position-embedding-type rope")
    if args.recompute_activations:
        args.recompute_granularity = "selective"
    for dest in ("no_save_optim", "no_save_rng", "no_load_optim", "no_load_rng"):
        setattr(args, dest, bool(getattr(args, dest)))
    if args.dataloader_type is None:
        args.dataloader_type = "single"
    if args.num_query_groups != 1 and not args.group_query_attention:
        raise ConfigError(f"--num-query-groups {args.num_query_groups} needs --group-query-attention")


def _derive_device(args) -> None:
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is visible; use --device cpu (gloo)")
    if args.distributed_backend is None:
        args.distributed_backend = "nccl" if args.device == "cuda" else "gloo"


def _derive_parallel(args, world_size: int) -> None:
    """tp / pp / dp / vpp as Megatron derives them (EE-Tuning: dp counts only the stages that run)."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    for flag, value in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if args.tune_exit:
        # EE-LLM: no clamping in tune mode; the grid holds only the stages that run.
        if args.tune_exit_pipeline_parallel_size is None:
            args.tune_exit_pipeline_parallel_size = 1  # EE-LLM's default
        run_pp = args.tune_exit_pipeline_parallel_size
        if not 1 <= run_pp <= pp:
            raise ConfigError(f"--tune-exit-pipeline-parallel-size ({run_pp}) must lie in "
                              f"1..--pipeline-model-parallel-size ({pp})")
    else:
        if args.tune_exit_pipeline_parallel_size is not None:
            raise ConfigError("--tune-exit-pipeline-parallel-size only applies to EE-Tuning: add --tune-exit or "
                              "drop it")
        clamped_tp = min(tp, world_size)
        clamped_pp = min(pp, world_size // clamped_tp)
        if (clamped_tp, clamped_pp) != (tp, pp):
            tp, pp = clamped_tp, clamped_pp
            _info(args, f"world size {world_size} is smaller than tp x pp; running with --tensor-model-parallel-size "
                        f"{tp} --pipeline-model-parallel-size {pp} (Megatron's clamp)", logging.WARNING)
            args.tensor_model_parallel_size, args.pipeline_model_parallel_size = tp, pp
        run_pp = pp
    if world_size % (tp * run_pp):
        pp_flag = "--tune-exit-pipeline-parallel-size" if args.tune_exit else "--pipeline-model-parallel-size"
        raise ConfigError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) x {pp_flag} "
            f"({run_pp}) = {tp * run_pp}; launch a multiple of {tp * run_pp} processes or change the sizes")
    args.data_parallel_size = world_size // (tp * run_pp)
    args.virtual_pipeline_model_parallel_size = _virtual_pipeline_size(args, pp)
    if args.sequence_parallel and tp == 1:
        args.sequence_parallel = False
        _info(args, "--sequence-parallel has no effect at --tensor-model-parallel-size 1; turned off (as Megatron)")


def _virtual_pipeline_size(args, pp: int) -> int | None:
    n = args.num_layers_per_virtual_pipeline_stage
    if n is None:
        return None
    flag = "--num-layers-per-virtual-pipeline-stage"
    if n < 1:
        raise ConfigError(f"{flag} must be >= 1, got {n}")
    if pp == 1:
        raise ConfigError(f"{flag} needs --pipeline-model-parallel-size > 1; drop the flag or raise the pipeline size")
    if not args.layers_per_stage and not _positive(args.num_layers):
        return None  # ModelConfig.validate names --num-layers
    counts = args.layers_per_stage or ([args.num_layers // pp] if args.num_layers % pp == 0 else None)
    if counts is None:
        raise ConfigError(f"--num-layers ({args.num_layers}) is not divisible by --pipeline-model-parallel-size "
                          f"({pp}); change the sizes or give an uneven split with --layers-per-stage")
    if n > min(counts):
        raise ConfigError(f"{flag} {n} exceeds the layers of a stage ({min(counts)}): fewer layers than chunks; "
                          "lower it")
    chunks = {c // n for c in counts}
    if any(c % n for c in counts) or len(chunks) != 1:
        raise ConfigError(f"{flag} {n} must divide every stage's layer count {sorted(set(counts))} into the same "
                          "number of chunks")
    return chunks.pop()


def _positive(*values) -> bool:
    return all(isinstance(v, int) and v >= 1 for v in values)


def _derive_model(args) -> None:
    """Megatron's defaults of the model sizes (the sizes themselves are checked by ModelConfig.validate)."""
    h, heads = args.hidden_size, args.num_attention_heads
    if args.ffn_hidden_size is None and _positive(h):
        args.ffn_hidden_size = int(8 * h / 3 / 64) * 64 if args.swiglu else 4 * h
    if args.kv_channels is None and _positive(h, heads) and h % heads == 0:
        args.kv_channels = h // heads  # else ModelConfig.validate explains
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.position_embedding_type == "rope":
        args.add_position_embedding = False  # EE-LLM: rope replaces the learned position table
    # --fp16 with --bf16 is refused by OptimizerConfig.validate_precision.
    args.params_dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32
    if args.bf16 and not args.accumulate_allreduce_grads_in_fp32:
        args.accumulate_allreduce_grads_in_fp32 = True
        _info(args, "--bf16: accumulating and all-reducing gradients in fp32 (as Megatron)")


def _derive_batch(args) -> None:
    """The global batch's default and the microbatch count (both checked by TrainingConfig.validate)."""
    mb, dp = args.micro_batch_size, args.data_parallel_size
    if args.global_batch_size is None and _positive(mb):
        args.global_batch_size = mb * dp
        _info(args, f"--global-batch-size not given: using --micro-batch-size x dp = {args.global_batch_size}")
    gb = args.global_batch_size
    args.num_microbatches = gb // (mb * dp) if _positive(mb, gb) else 0


def _derive_early_exit(args) -> None:
    """The per-exit lists' defaults (EarlyExitConfig's) and the bubble-fill counts (fill_counts')."""
    ee = EarlyExitConfig(exit_layer_nums=list(args.exit_layer_nums), exit_layer_weight=list(args.exit_layer_weight),
                         exit_layer_weight_init=list(args.exit_layer_weight_init),
                         exit_layer_temperature=list(args.exit_layer_temperature))
    args.exit_layer_weight, args.exit_layer_weight_init = ee.weights, ee.weight_inits
    args.exit_layer_temperature = ee.temperatures
    if not args.fill_explicit_bubbles:
        return
    given = (args.num_fill_warmup_microbatches, args.num_fill_cooldown_microbatches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reported below, once per job instead of once per rank
        try:
            counts = fill_counts(args.pipeline_model_parallel_size, args.backward_forward_ratio, *given)
        except ScheduleError as e:
            raise ConfigError(str(e)) from None
    for flag, asked, used in zip(("--num-fill-warmup-microbatches", "--num-fill-cooldown-microbatches"), given, counts):
        if asked is not None and asked != used:
            _info(args, f"{flag} {asked} is more than the bubbles of pp {args.pipeline_model_parallel_size} hold "
                        f"(--backward-forward-ratio {args.backward_forward_ratio}); using {used}", logging.WARNING)
    args.num_fill_warmup_microbatches, args.num_fill_cooldown_microbatches = counts


def resolve(args: argparse.Namespace, world_size: int | None = None, *, training: bool = True,
            vocab_size: int | None = None) -> RunConfig:
    """The one configuration step: derive Megatron's values on ``args`` and return the validated
    :class:`RunConfig` of the run.

    ``world_size`` defaults to ``args.world_size`` (torchrun's ``WORLD_SIZE``). ``training=False``
    (tools, inference) skips the checks that only a training run needs (run length, lr, data).
    ``vocab_size``: the tokenizer's (build it first); without it ``--vocab-size`` or
    ``--padded-vocab-size`` must be given. With it, ``args.padded_vocab_size`` records the padded
    vocabulary (checkpoints keep one for every tp). Idempotent: resolving twice changes nothing."""
    world_size = world_size if world_size is not None else getattr(args, "world_size", 1)
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    args.world_size = world_size
    _normalize(args)
    _derive_device(args)
    _derive_model(args)
    _derive_parallel(args, world_size)
    _derive_batch(args)
    _derive_early_exit(args)
    cfg = RunConfig.from_args(args, vocab_size).validate(training=training)
    if vocab_size is not None and args.padded_vocab_size is None:
        args.padded_vocab_size = cfg.model.padded_vocab_size = cfg.model.padded_vocab(cfg.parallel.tp)
    return cfg
