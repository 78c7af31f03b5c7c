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
from megatron.text_generation.request import DEFAULT_LIMITS, GenerationRequest, GenerationResult, ServerLimits
from megatron.text_generation.server import GenerationService, InferenceServer, ModelInfo
from megatron.text_generation.server_ranks import RanksDiverged, distributed_generate, worker_loop

__all__ = ["add_server_args", "server_args", "server_limits", "make_service", "serve", "model_info"]

log = logging.getLogger(__name__)


def add_server_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group(title="text generation server")
    g.add_argument("--port", type=int, default=5000, help="HTTP port of the server (EE-LLM's default 5000).")
    g.add_argument("--host", default="127.0.0.1",
                   help="Interface to listen on; 0.0.0.0 serves the network (no authentication: trusted networks only).")
    g.add_argument("--model-name", default=None, help="Name reported by /health and /v1/completions "
                                                      "(default: the --load directory's name).")
    d = DEFAULT_LIMITS
    for flag, kind, default, what in (
        ("--max-body-bytes", int, d.max_body_bytes, "Largest request body; a larger one gets HTTP 413."),
        ("--max-prompts", int, d.max_prompts, "Most prompts in one request."),
        ("--max-beam-width", int, d.max_beam_width, "Widest beam search (also never wider than the vocabulary)."),
        ("--max-batch-tokens", int, d.max_batch_tokens,
         "Most rows (prompts, or beams) x (longest prompt + tokens to generate) of one request: its KV cache."),
        ("--max-connections", int, d.max_connections, "Most open HTTP connections; more get HTTP 503."),
        ("--read-timeout", float, d.read_timeout_s,
         "Seconds a client may take to send a whole request (headers and body); then HTTP 408 or a dropped "
         "connection."),
        ("--rank-sync-timeout", float, d.sync_timeout_s,
         "Seconds every rank may take to confirm the end of a request after the first one; past it the ranks "
         "cannot agree, /health reports the failure and the server exits with status 1."),
    ):
        g.add_argument(flag, type=_positive(kind), default=default, help=f"{what} Default {default}.")
    return parser


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def server_limits(args: argparse.Namespace) -> ServerLimits:
    return ServerLimits(max_body_bytes=args.max_body_bytes, max_prompts=args.max_prompts,
                        max_beam_width=args.max_beam_width, max_batch_tokens=args.max_batch_tokens,
                        max_connections=args.max_connections, read_timeout_s=args.read_timeout,
                        sync_timeout_s=args.rank_sync_timeout)


def server_args(argv=None) -> argparse.Namespace:
    """Parse and check the server's command line (before any process group exists): the model flags as
    :func:`~megatron.checkpoint.model_loader.inference_args` checks them, plus the server's own."""
    return inference_args(argv, extra_args_provider=add_server_args)


def make_service(generate_fn: Callable[[GenerationRequest], GenerationResult], state: ParallelState,
                 info: ModelInfo, limits: ServerLimits = DEFAULT_LIMITS) -> GenerationService:
    """Rank 0's service: with more than one rank, requests are broadcast before generating."""
    if state.dims.world_size > 1:
        return GenerationService(distributed_generate(generate_fn, state, limits.sync_timeout_s), info, state=state,
                                 limits=limits)
    return GenerationService(generate_fn, info, limits=limits)


def serve(generate_fn: Callable[[GenerationRequest], GenerationResult], state: ParallelState, info: ModelInfo,
          host: str, port: int, limits: ServerLimits = DEFAULT_LIMITS) -> int:
    """Global rank 0 serves HTTP until interrupted; every other rank follows its broadcasts. Returns the
    process's exit status: 0, or 1 when the ranks could no longer agree (a supervisor should restart)."""
    if state.rank == 0:
        return InferenceServer(make_service(generate_fn, state, info, limits), host, port).serve_forever()
    try:
        served = worker_loop(generate_fn, state, limits.sync_timeout_s)
    except RanksDiverged as e:
        log.error("rank %d: %s; exiting", state.rank, e)
        return 1
    log.info("rank %d: shut down after %d request(s)", state.rank, served)
    return 0


def model_info(args: argparse.Namespace, run, tokenizer=None) -> ModelInfo:
    """What ``/health`` reports of the model; ``run``: its configuration (``LoadedModel.run``)."""
    name = args.model_name or (os.path.basename(os.path.normpath(args.load)) if args.load else "random-weights")
    return ModelInfo(name=name, num_layers=run.model.num_layers, exit_layers=list(run.early_exit.exit_layer_nums),
                     pp=run.parallel.pp, max_positions=run.model.max_positions, vocab_size=run.model.vocab_size,
                     estimators=run.early_exit.exit_estimator,
                     tokenize=tokenizer.tokenize if tokenizer is not None else None,
                     detokenize=tokenizer.detokenize if tokenizer is not None else None)
