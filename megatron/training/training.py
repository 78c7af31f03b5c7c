"""``pretrain``: a whole training run from parsed flags (what ``pretrain_early_exit_gpt.py`` calls).

Order: ``--use-checkpoint-args`` restores the model flags from ``--load``; validation of the whole
configuration and the tokenizer come before any process group (``setup.initialize``); then the model,
buffers, optimizer and scheduler (``setup.build_run``), the checkpoint load (``resume.load_run``), the
data iterators resumed from the consumed samples (``setup.attach_data``), trackers, and the loop
(``loop.train``). A process group this function created is destroyed at the end.
"""

from __future__ import annotations

import argparse
import time

import torch.distributed as dist

from megatron.checkpoint import load_args_from_checkpoint
from megatron.training.loop import TrainResult, train
from megatron.training.resume import load_run
from megatron.training.setup import attach_data, build_run, initialize
from megatron.training.trackers import build_trackers

__all__ = ["pretrain"]


def _tracker_config(args: argparse.Namespace) -> dict:
    """The flags as plain values (W&B's run config)."""
    return {k: v if isinstance(v, (int, float, str, bool, list, type(None))) else str(v) for k, v in vars(args).items()}


def pretrain(args: argparse.Namespace, start_time: float | None = None) -> TrainResult:
    """Train (and evaluate, save) as the flags in ``args`` say; returns what the run did on this rank."""
    start_time = time.time() if start_time is None else start_time
    had_group = dist.is_initialized()
    if args.use_checkpoint_args and args.load:
        load_args_from_checkpoint(args, args.load, args.load_iteration)
    cfg, state, tokenizer = initialize(args)
    owns_group = dist.is_initialized() and not had_group
    try:
        eod = tokenizer.eod if tokenizer is not None and tokenizer.eod >= 0 else None
        run = build_run(args, cfg, state, eod)
        load_run(run)
        attach_data(run, tokenizer)
        trackers = build_trackers(cfg.logging, cfg.checkpoint.save, _tracker_config(args), active=state.rank == 0)
        try:
            return train(run, trackers, start_time)
        finally:
            trackers.close()
    finally:
        if owns_group:
            dist.destroy_process_group()
