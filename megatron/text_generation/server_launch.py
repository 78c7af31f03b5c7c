"""Start-up of the text-generation server (``tools/run_early_exit_text_generation_server.py``): its
flags, the weights-source check, the process grid, the model chunks with their checkpoint, and the
split into the HTTP rank (global 0) and the worker ranks.

Differences from EE-LLM, on purpose: without ``--load`` the server refuses to start unless
``--random-weights`` is given (EE-LLM silently served an untrained model); the world must be exactly
tp x pp processes (no silent clamping or data-parallel replicas); the host defaults to the loopback
interface (EE-LLM listened on 0.0.0.0: pass ``--host 0.0.0.0`` to serve the network).
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Callable

from megatron.arguments import parse_args, resolve
from megatron.config import ConfigError
from megatron.core.parallel_state import ParallelState, init_distributed
from megatron.model import EarlyExitGPTModel
from megatron.run_config import RunConfig
from megatron.text_generation.request import GenerationRequest, GenerationResult
from megatron.text_generation.server import (
    GenerationService,
    InferenceServer,
    ModelInfo,
    distributed_generate,
    worker_loop,
)
from megatron.tokenizer.build import build_tokenizer_from_args
from megatron.training.checkpoint import load_args_from_checkpoint, load_checkpoint

__all__ = ["add_server_args", "server_args", "check_weights_source", "build_model_chunks", "load_weights",
           "make_service", "serve", "build", "model_info"]

log = logging.getLogger(__name__)


def add_server_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group(title="text generation server")
    g.add_argument("--port", type=int, default=5000, help="HTTP port of the server (EE-LLM's default 5000).")
    g.add_argument("--host", default="127.0.0.1",
                   help="Interface to listen on; 0.0.0.0 serves the network (no authentication: trusted networks only).")
    g.add_argument("--random-weights", action="store_true",
                   help="Serve a randomly initialised model when no --load is given (tests and demos only).")
    g.add_argument("--model-name", default=None, help="Name reported by /health and /v1/completions "
                                                      "(default: the --load directory's name).")
    return parser


def check_weights_source(args: argparse.Namespace) -> None:
    if args.load is None and not args.random_weights:
        raise ConfigError("no --load checkpoint given: the server would answer with an untrained model. Pass "
                          "--load DIR (with --use-checkpoint-args to take the model shape from it), or "
                          "--random-weights to serve random weights on purpose")
    if args.load is not None and args.random_weights:
        raise ConfigError("--random-weights and --load exclude each other; drop one")
    if args.use_checkpoint_args and args.load is None:
        raise ConfigError("--use-checkpoint-args needs --load DIR")


def server_args(argv=None) -> argparse.Namespace:
    """Parse and check the server's command line (before any process group exists); EE-LLM's
    server defaults: no optimizer or RNG state is loaded and a missing checkpoint is an error."""
    args = parse_args(argv, extra_args_provider=add_server_args)
    check_weights_source(args)
    if args.load is not None:
        args.no_load_optim = args.no_load_rng = args.exit_on_missing_checkpoint = True
    if args.use_checkpoint_args:
        load_args_from_checkpoint(args, args.load, args.load_iteration)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if args.world_size != tp * pp:
        origin = (" (the checkpoint's sizes, taken by --use-checkpoint-args; to serve at other sizes reshard it "
                  "with tools/checkpoint/util.py)") if args.use_checkpoint_args else ""
        raise ConfigError(f"the server runs one model replica: launch exactly --tensor-model-parallel-size x "
                          f"--pipeline-model-parallel-size = {tp} x {pp} = {tp * pp} processes{origin} (torchrun "
                          f"--nproc_per_node {tp * pp}), not {args.world_size}")
    if args.num_layers_per_virtual_pipeline_stage is not None:
        raise ConfigError("generation runs one model chunk per rank: drop --num-layers-per-virtual-pipeline-stage "
                          "(the checkpoint loads the same without it only if saved without it: reshard with "
                          "tools/checkpoint/util.py)")
    args.sequence_parallel = False  # one token at a time: nothing to split along the sequence
    return args


def build_model_chunks(run: RunConfig, state: ParallelState) -> list[EarlyExitGPTModel]:
    """This rank's model chunks (one per virtual stage), in eval mode on the rank's device."""
    layout = run.partition()
    chunks = [EarlyExitGPTModel(run.model, run.early_exit, state=state, partition=layout, chunk=c,
                                layers_per_stage=run.parallel.layers_per_stage)
              for c in range(run.parallel.chunks)]
    return [chunk.to(state.device).eval() for chunk in chunks]


def load_weights(args: argparse.Namespace, chunks: list, state: ParallelState) -> None:
    """Load ``--load`` into ``chunks`` (model weights only), or keep the seeded random init."""
    if args.load is None:
        log.warning("serving RANDOM weights (--random-weights): the answers are noise")
        return
    load_checkpoint(args.load, chunks, None, None, state, args, load_iteration=args.load_iteration,
                    finetune=True, no_load_optim=True, no_load_rng=True, exit_on_missing_checkpoint=True)


def build(args: argparse.Namespace):
    """(run config, parallel state, tokenizer, model chunks) of this rank, weights loaded."""
    tokenizer = build_tokenizer_from_args(args, tp=args.tensor_model_parallel_size)
    run = resolve(args, args.world_size, training=False, vocab_size=tokenizer.vocab_size)
    init_distributed(run.parallel.distributed_backend, timeout_s=60.0 * run.parallel.distributed_timeout_minutes)
    state = ParallelState.build(run.parallel.dims, run.parallel.distributed_backend, run.parallel.device)
    chunks = build_model_chunks(run, state)
    load_weights(args, chunks, state)
    return run, state, tokenizer, chunks


def make_service(generate_fn: Callable[[GenerationRequest], GenerationResult], state: ParallelState,
                 info: ModelInfo) -> GenerationService:
    """Rank 0's service: with more than one rank, requests are broadcast before generating."""
    if state.dims.world_size > 1:
        return GenerationService(distributed_generate(generate_fn, state), info, state=state)
    return GenerationService(generate_fn, info)


def serve(generate_fn: Callable[[GenerationRequest], GenerationResult], state: ParallelState, info: ModelInfo,
          host: str, port: int) -> None:
    """Global rank 0 serves HTTP until interrupted; every other rank follows its broadcasts."""
    if state.rank == 0:
        InferenceServer(make_service(generate_fn, state, info), host, port).serve_forever()
    else:
        served = worker_loop(generate_fn, state)
        log.info("rank %d: shut down after %d request(s)", state.rank, served)


def model_info(args: argparse.Namespace, run: RunConfig, tokenizer=None) -> ModelInfo:
    name = args.model_name or (os.path.basename(os.path.normpath(args.load)) if args.load else "random-weights")
    return ModelInfo(name=name, num_layers=run.model.num_layers, exit_layers=list(run.early_exit.exit_layer_nums),
                     pp=run.parallel.pp, max_positions=run.model.max_positions, tokenize=tokenizer.tokenize if tokenizer is not None else None,
                     detokenize=tokenizer.detokenize if tokenizer is not None else None)
