"""Start-up of the text-generation server (``tools/run_early_exit_text_generation_server.py``): its
flags, and the split into the HTTP rank (global 0) and the worker ranks. The model of each rank (weights
source check, one-replica world, chunks and checkpoint) comes from :mod:`megatron.checkpoint.model_loader`,
shared with evaluation and training.

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

from megatron.checkpoint.model_loader import inference_args
from megatron.core.parallel_state import ParallelState
from megatron.text_generation.request import GenerationRequest, GenerationResult
from megatron.text_generation.server import (
    GenerationService,
    InferenceServer,
    ModelInfo,
    distributed_generate,
    worker_loop,
)

__all__ = ["add_server_args", "server_args", "make_service", "serve", "model_info"]

log = logging.getLogger(__name__)


def add_server_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group(title="text generation server")
    g.add_argument("--port", type=int, default=5000, help="HTTP port of the server (EE-LLM's default 5000).")
    g.add_argument("--host", default="127.0.0.1",
                   help="Interface to listen on; 0.0.0.0 serves the network (no authentication: trusted networks only).")
    g.add_argument("--model-name", default=None, help="Name reported by /health and /v1/completions "
                                                      "(default: the --load directory's name).")
    return parser


def server_args(argv=None) -> argparse.Namespace:
    """Parse and check the server's command line (before any process group exists): the model flags as
    :func:`~megatron.checkpoint.model_loader.inference_args` checks them, plus the server's own."""
    return inference_args(argv, extra_args_provider=add_server_args)


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


def model_info(args: argparse.Namespace, run, tokenizer=None) -> ModelInfo:
    """What ``/health`` reports of the model; ``run``: its configuration (``LoadedModel.run``)."""
    name = args.model_name or (os.path.basename(os.path.normpath(args.load)) if args.load else "random-weights")
    return ModelInfo(name=name, num_layers=run.model.num_layers, exit_layers=list(run.early_exit.exit_layer_nums),
                     pp=run.parallel.pp, max_positions=run.model.max_positions, tokenize=tokenizer.tokenize if tokenizer is not None else None,
                     detokenize=tokenizer.detokenize if tokenizer is not None else None)
