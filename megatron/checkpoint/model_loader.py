"""The model of this rank from flags and a checkpoint: the one place training, the text-generation server,
evaluation and the tools build model chunks and fill them with a checkpoint's weights.

- :func:`build_model_chunks`: this rank's :class:`~megatron.model.EarlyExitGPTModel` chunks (one per virtual
  stage) on its device, from the run's configuration. Training builds its chunks here too (and then freezes
  the backbone under ``--tune-exit``); its full resume (optimizer, RNG, progress) is ``training/resume.py``.
- :func:`inference_args`: the command line of a model that generates or is evaluated (Megatron / EE-LLM
  model flags plus ``--random-weights``), checked before any process group exists: a weights source is
  required, the world is one replica of tp x pp processes, one chunk per rank.
- :func:`load_inference_model`: tokenizer, validated configuration, process groups, chunks in eval mode and
  the ``--load`` weights (our layout or EE-LLM's nested one, checksums verified: see ``load.py``).

It lives in the checkpoint package rather than in ``megatron/model``: it composes the flags, the process
grid, the model and the checkpoint reader, and the model package stays free of files and flags.
"""

from __future__ import annotations

import argparse
import logging
from typing import NamedTuple

from megatron.arguments import parse_args, resolve
from megatron.core.parallel_state import ParallelState, init_distributed
from megatron.errors import ConfigError
from megatron.model import EarlyExitGPTModel
from megatron.run_config import RunConfig
from megatron.tokenizer.build import build_tokenizer_from_args

from .load import load_args_from_checkpoint, load_checkpoint

__all__ = ["build_model_chunks", "load_model_weights", "add_model_source_args", "check_model_source",
           "inference_args", "load_inference_model", "LoadedModel"]

log = logging.getLogger(__name__)


def build_model_chunks(run: RunConfig, state: ParallelState, *, rng_tracker=None,
                       initialize: bool | str = True) -> list[EarlyExitGPTModel]:
    """This rank's model chunks (one per virtual stage) on the rank's device, initialised from the run's
    seed, or (``initialize="skip"``) left undrawn because a checkpoint is loaded into them next.
    ``rng_tracker``: the tensor-parallel RNG streams dropout draws from (training)."""
    layout = run.partition()
    return [EarlyExitGPTModel(run.model, run.early_exit, state=state, partition=layout, chunk=c,
                              rng_tracker=rng_tracker, initialize=initialize).to(state.device)
            for c in range(run.parallel.chunks)]


def load_model_weights(load_dir: str, chunks: list, state: ParallelState, args: argparse.Namespace,
                       load_iteration: int = 0) -> int:
    """Fill ``chunks`` with the model weights of checkpoint ``load_dir`` (no optimizer, RNG or progress;
    a missing checkpoint is an error). Returns the iteration loaded (0 for ``release``)."""
    return load_checkpoint(load_dir, chunks, None, None, state, args, load_iteration=load_iteration,
                           finetune=True, no_load_optim=True, no_load_rng=True, exit_on_missing_checkpoint=True)


def add_model_source_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group(title="model weights")
    g.add_argument("--random-weights", action="store_true",
                   help="Use a randomly initialised model when no --load is given (tests and demos only).")
    return parser


def check_model_source(args: argparse.Namespace) -> None:
    """Exactly one weights source: ``--load`` or ``--random-weights`` (EE-LLM silently used random weights)."""
    if args.load is None and not args.random_weights:
        raise ConfigError("no --load checkpoint given: the model would answer with untrained weights. Pass "
                          "--load DIR (with --use-checkpoint-args to take the model shape from it), or "
                          "--random-weights to use random weights on purpose")
    if args.load is not None and args.random_weights:
        raise ConfigError("--random-weights and --load exclude each other; drop one")
    if args.use_checkpoint_args and args.load is None:
        raise ConfigError("--use-checkpoint-args needs --load DIR")


def inference_args(argv=None, extra_args_provider=None) -> argparse.Namespace:
    """Parse and check the command line of a generating / evaluated model (before any process group
    exists); EE-LLM's server defaults: no optimizer or RNG state is loaded and a missing checkpoint is an
    error. ``extra_args_provider(parser)`` adds a program's own flags (the server's host and port)."""
    def provider(parser):
        add_model_source_args(parser)
        return extra_args_provider(parser) if extra_args_provider is not None else parser

    args = parse_args(argv, extra_args_provider=provider)
    check_model_source(args)
    if args.load is not None:
        args.no_load_optim = args.no_load_rng = args.exit_on_missing_checkpoint = True
    if args.use_checkpoint_args:
        load_args_from_checkpoint(args, args.load, args.load_iteration)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if args.world_size != tp * pp:
        origin = (" (the checkpoint's sizes, taken by --use-checkpoint-args; to run at other sizes reshard it "
                  "with tools/checkpoint/util.py)") if args.use_checkpoint_args else ""
        raise ConfigError(f"generation runs one model replica: launch exactly --tensor-model-parallel-size x "
                          f"--pipeline-model-parallel-size = {tp} x {pp} = {tp * pp} processes{origin} (torchrun "
                          f"--nproc_per_node {tp * pp}), not {args.world_size}")
    if args.num_layers_per_virtual_pipeline_stage is not None:
        raise ConfigError("generation runs one model chunk per rank: drop --num-layers-per-virtual-pipeline-stage "
                          "(the checkpoint loads the same without it only if saved without it: reshard with "
                          "tools/checkpoint/util.py)")
    args.sequence_parallel = False  # one token at a time: nothing to split along the sequence
    return args


class LoadedModel(NamedTuple):
    """This rank's model as generation and evaluation use it: configuration, parallel state, tokenizer and
    chunks (in eval mode, weights loaded)."""

    run: RunConfig
    state: ParallelState
    tokenizer: object
    chunks: list[EarlyExitGPTModel]

    @property
    def num_layers(self) -> int:
        return self.run.model.num_layers

    @property
    def exit_layers(self) -> list[int]:
        return list(self.run.early_exit.exit_layer_nums)


def load_inference_model(args: argparse.Namespace) -> LoadedModel:
    """The model of this rank from :func:`inference_args`' result: builds the tokenizer and the validated
    configuration, the process groups, then the chunks, and loads ``--load`` into them (or keeps the seeded
    random initialisation under ``--random-weights``)."""
    tokenizer = build_tokenizer_from_args(args, tp=args.tensor_model_parallel_size)
    run = resolve(args, args.world_size, training=False, vocab_size=tokenizer.vocab_size)
    init_distributed(run.parallel.distributed_backend, timeout_s=60.0 * run.parallel.distributed_timeout_minutes)
    state = ParallelState.build(run.parallel.dims, run.parallel.distributed_backend, run.parallel.device)
    # With --load the checkpoint must exist (exit_on_missing_checkpoint) and loads strictly: skip the draws.
    initialize = "skip" if args.load is not None else True
    chunks = [chunk.eval() for chunk in build_model_chunks(run, state, initialize=initialize)]
    if args.load is None:
        log.warning("using RANDOM weights (--random-weights): the answers are noise")
    else:
        load_model_weights(args.load, chunks, state, args, args.load_iteration)
    return LoadedModel(run, state, tokenizer, chunks)
