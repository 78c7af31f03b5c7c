"""Building a training run from validated flags: process groups, seeds, model chunks, gradient buffers,
optimizer, scheduler, schedules and data iterators.

Order (Megatron's, with the validation moved before any process group): ``initialize`` builds the
tokenizer, resolves the flags with the world size from the environment into the validated
:class:`~megatron.run_config.RunConfig` (``megatron.arguments.resolve``, the one configuration step),
and only then creates the process groups;
``build_run`` seeds the generators, builds the model (frozen backbone under ``--tune-exit``), the
gradient buffers, optimizer and scheduler. Data iterators are built by ``attach_data`` after a
checkpoint load, because the samplers resume from the restored consumed-sample counts (the run's
progress, kept on :class:`TrainingRun` and written to ``args`` when a checkpoint is saved).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.distributed as dist

from megatron.arguments import resolve
from megatron.checkpoint.layout import read_tracker
from megatron.checkpoint.model_loader import build_model_chunks
from megatron.core.distributed.finalize import TiedGroups, late_params
from megatron.core.distributed.grad_buffer import GradBuffers
from megatron.core.parallel_state import ParallelState, init_distributed
from megatron.core.pipeline_parallel.schedules import BACKWARD_KINDS, ActionKind, Schedule
from megatron.core.tensor_parallel.random import RNGStatesTracker, model_parallel_seed
from megatron.core.tensor_parallel.range_checks import check_token_batch
from megatron.data.batch_utils import broadcast_data
from megatron.data.gpt_dataset import build_train_valid_test_datasets
from megatron.data.mock_dataset import build_mock_train_valid_test_datasets
from megatron.data.samplers import build_data_iterator, build_pretraining_data_loader
from megatron.data.token_range import data_vocabulary
from megatron.model import EarlyExitGPTModel
from megatron.model.partition import Partition
from megatron.optimizer import MixedPrecisionOptimizer, OptimizerParamScheduler, build_scheduler, get_megatron_optimizer
from megatron.run_config import RunConfig
from megatron.tokenizer import build_tokenizer_from_args
from megatron.training.forward_backward import ScheduleOptions, activation_shape, build_schedule

__all__ = ["TrainingRun", "initialize", "build_run", "attach_data", "read_text", "is_exit_param",
           "set_train_mode", "world_from_env"]

log = logging.getLogger(__name__)


@dataclass
class TrainingRun:
    """Everything the loop needs, built once, and the run's progress (``iteration`` and the consumed
    samples). ``args`` is the run's Megatron-named Namespace, stored in checkpoints as ``args``: the
    progress is written into it when a checkpoint is saved (``resume.save_run``), as Megatron keeps it."""

    args: argparse.Namespace
    cfg: RunConfig
    state: ParallelState
    partition: Partition
    chunks: list[EarlyExitGPTModel]
    buffers: list[GradBuffers]
    optimizer: MixedPrecisionOptimizer
    scheduler: OptimizerParamScheduler
    tied_groups: TiedGroups | None
    rng_tracker: RNGStatesTracker
    schedule: Schedule
    eval_schedule: Schedule
    tensor_shape: tuple[int, int, int]
    train_iters: int
    eod: int | None = None
    iteration: int = 0  # completed iterations
    consumed_train_samples: int = 0  # training samples read so far (the samplers resume from it)
    consumed_valid_samples: int = 0  # validation samples read so far
    flops_so_far: float = 0  # floating-point operations of earlier runs (carried from checkpoint to checkpoint)
    train_iter: object = None
    valid_iter: object = None
    has_valid: bool = False
    source_iteration: tuple[int, bool] | None = None  # the loaded checkpoint (iteration, release)
    last_saved: int | None = None

    @property
    def partial_stages(self) -> bool:
        """EE-Tuning that builds fewer stages than the model has (--tune-exit-pipeline-parallel-size)."""
        return self.state.pp < self.cfg.parallel.pp

    @property
    def samples_per_iteration(self) -> int:
        """Samples read per iteration: bubble filling reads fill microbatches beyond the global batch."""
        t = self.cfg.training
        return self.schedule.header.num_microbatches_total * t.micro_batch_size * self.cfg.parallel.dp


def world_from_env() -> tuple[int, int]:
    """(rank, world size): from an initialised process group, else torchrun's environment."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def initialize(args: argparse.Namespace) -> tuple[RunConfig, ParallelState, object]:
    """Build the tokenizer, resolve the flags (once) into the validated config, then the process groups.
    Returns ``(cfg, state, tokenizer or None)``."""
    args.rank, world = world_from_env()
    tokenizer = None
    if args.tokenizer_type is not None:
        tokenizer = build_tokenizer_from_args(args, args.tensor_model_parallel_size)
    cfg = resolve(args, world, vocab_size=tokenizer.vocab_size if tokenizer is not None else None)
    p = cfg.parallel
    init_distributed(p.distributed_backend, timeout_s=60.0 * p.distributed_timeout_minutes)
    if dist.is_initialized():
        state = ParallelState.build(p.dims, p.distributed_backend, "cpu" if p.device == "cpu" else None)
    else:
        state = ParallelState.single(p.device)
    return cfg, state, tokenizer


def _seed(cfg: RunConfig, state: ParallelState) -> RNGStatesTracker:
    """Megatron's seeds: ``seed + 100 * pp_rank`` (+ ``10 * dp_rank`` with --data-parallel-random-init)."""
    seed = cfg.model.seed + 100 * state.pp_rank
    if cfg.training.data_parallel_random_init:
        seed += 10 * state.dp_rank
    random.seed(seed)
    np.random.seed(seed)
    return model_parallel_seed(seed, state)


def is_exit_param(name: str) -> bool:
    """EE-LLM's EE-Tuning rule: exit output layers, exit norms, exit blocks and branch MLPs train."""
    return "exit" in name or ".branch." in name


def _freeze_backbone(chunks: list[EarlyExitGPTModel]) -> None:
    for chunk in chunks:
        chunk.frozen_backbone = True  # its forward then runs the backbone without autograd
        for name, p in chunk.named_parameters():
            # A shared copy of a frozen projection (output_layer_for_exits) must stay equal to the frozen
            # original, so it is frozen too although its name contains "exit".
            p.requires_grad_(is_exit_param(name) and not getattr(p, "shared", False))


def set_train_mode(chunks: list[EarlyExitGPTModel], tune_exit: bool) -> None:
    """Training mode. Under EE-Tuning a module is in training mode (its dropout on) iff every parameter it
    holds trains; a module holding none follows its parent. So the exits (blocks, branch MLPs with their
    residual dropout, norms, heads) drop out as in full training and the frozen backbone does not (EE-LLM
    left it on). The rule reads the parameters ``_freeze_backbone`` froze, not module names."""
    for chunk in chunks:
        chunk.train()
        if tune_exit:
            _train_if_all_params_train(chunk, False)


def _train_if_all_params_train(module: torch.nn.Module, parent: bool) -> None:
    params = list(module.parameters())
    module.training = all(p.requires_grad for p in params) if params else parent
    for child in module.children():
        _train_if_all_params_train(child, module.training)


def _initialization(cfg: RunConfig) -> bool | str:
    """``"skip"`` when ``--load`` holds a checkpoint: it is loaded (strictly: every weight) right after the
    build, so drawing initial weights first would only cost time (minutes on a large model)."""
    c = cfg.checkpoint
    will_load = c.load is not None and (c.load_iteration != 0 or read_tracker(c.load) is not None)
    return "skip" if will_load else True


def _build_model(cfg: RunConfig, state: ParallelState, tracker) -> list[EarlyExitGPTModel]:
    chunks = build_model_chunks(cfg, state, rng_tracker=tracker, initialize=_initialization(cfg))
    if cfg.training.tune_exit:
        _freeze_backbone(chunks)
    set_train_mode(chunks, cfg.training.tune_exit)
    return chunks


def _train_iters(cfg: RunConfig) -> int:
    t = cfg.training
    return t.train_iters if t.train_iters is not None else t.train_samples // t.global_batch_size


def _forward_only(schedule: Schedule) -> Schedule:
    """The forwards of ``schedule`` without autograd and without its backward actions."""
    actions = {stage: tuple(replace(a, kind=ActionKind.F_NOGRAD) if a.kind is ActionKind.F else a
                            for a in acts if a.kind not in BACKWARD_KINDS)
               for stage, acts in schedule.actions.items()}
    return Schedule(schedule.header, actions)


def _schedules(cfg: RunConfig, state: ParallelState, part: Partition) -> tuple[Schedule, Schedule]:
    """(training, evaluation) schedules of this run's stages."""
    p, t = cfg.parallel, cfg.training
    # ScheduleOptions' fields are TrainingConfig fields of the same names (resolved there once), but for
    # the teacher, which the exits' objective decides.
    opts = ScheduleOptions(**{f.name: getattr(t, f.name) for f in fields(ScheduleOptions) if f.name != "teacher"},
                           teacher=cfg.early_exit.needs_teacher)
    m = t.num_microbatches
    if t.tune_exit and state.pp < p.pp:
        # Planned over the whole model's stages: the last stage built is not the model's head, and the
        # stream never reaches the stages that are not built.
        tuning = build_schedule(p.pp, 1, m, part.exit_positions, opts)
        return tuning, _forward_only(tuning)
    return (build_schedule(state.pp, p.chunks, m, part.exit_positions, opts),
            build_schedule(state.pp, p.chunks, m, part.exit_positions, opts, evaluation=True))


def build_run(args: argparse.Namespace, cfg: RunConfig, state: ParallelState, eod: int | None = None) -> TrainingRun:
    """Model, buffers, optimizer, scheduler and schedules of one run (collective: every rank calls it)."""
    tracker = _seed(cfg, state)
    part = cfg.partition()
    chunks = _build_model(cfg, state, tracker)
    o, p, t = cfg.optimizer, cfg.parallel, cfg.training
    buffers = [GradBuffers(c.parameters(), state.dp_group, state.dp, grad_dtype=o.main_grad_dtype,
                           overlap=p.overlap_grad_reduce, reduce_scatter=o.use_distributed_optimizer,
                           late_params=late_params(c)) for c in chunks]
    # Tuned runs train no shared projection (see _freeze_backbone) and may lack the stages holding them.
    tied = None if t.tune_exit else TiedGroups(chunks, state)
    optimizer = get_megatron_optimizer(o, chunks, state, buffers)
    scheduler = build_scheduler(optimizer, o, t.train_iters, t.train_samples, t.global_batch_size)
    schedule, eval_schedule = _schedules(cfg, state, part)
    shape = activation_shape(cfg.model.seq_length, t.micro_batch_size, cfg.model.hidden_size, state.tp,
                             cfg.model.sequence_parallel)
    return TrainingRun(args=args, cfg=cfg, state=state, partition=part, chunks=chunks, buffers=buffers,
                       optimizer=optimizer, scheduler=scheduler, tied_groups=tied, rng_tracker=tracker,
                       schedule=schedule, eval_schedule=eval_schedule, tensor_shape=shape,
                       train_iters=_train_iters(cfg), eod=eod)


# --------------------------------------------------------------------------------------------- data
def _datasets(run: TrainingRun, tokenizer, num_samples: list[int]):
    d, m = run.cfg.data, run.cfg.model
    if d.mock_data:
        vocab = tokenizer.vocab_size if tokenizer is not None else m.vocab_size
        return build_mock_train_valid_test_datasets(num_samples, m.seq_length, vocab, m.seed, run.eod)
    vocabulary = data_vocabulary(tokenizer, d.tokenizer_type)
    return build_train_valid_test_datasets(
        d.data_path, d.split, num_samples, m.seq_length, m.seed, d.data_cache_path,
        train_data_prefix=d.train_data_path, valid_data_prefix=d.valid_data_path,
        test_data_prefix=d.test_data_path, vocabulary=vocabulary)


def _iterator(run: TrainingRun, dataset, consumed: int):
    """This rank's iterator (tp rank 0 only: the others receive batches by broadcast)."""
    if dataset is None or len(dataset) == 0 or run.state.tp_rank != 0:
        return None
    t, d = run.cfg.training, run.cfg.data
    loader = build_pretraining_data_loader(dataset, consumed, t.micro_batch_size, run.state.dp_rank, run.state.dp,
                                           dataloader_type=d.dataloader_type, num_workers=d.num_workers)
    # Creating a DataLoader iterator draws a base seed from torch's generator; keep the generator where it
    # was, so dropout masks do not depend on when the iterators were built (exact resume).
    saved = torch.get_rng_state()
    try:
        return build_data_iterator(loader, d.dataloader_type)
    finally:
        torch.set_rng_state(saved)


def attach_data(run: TrainingRun, tokenizer) -> None:
    """Build the datasets (collective) and this rank's train / valid iterators, resumed from
    ``run.consumed_train_samples`` / ``run.consumed_valid_samples``."""
    t = run.cfg.training
    evaluations = run.train_iters // t.eval_interval + 1
    num_samples = [run.train_iters * run.samples_per_iteration,
                   evaluations * t.eval_iters * t.global_batch_size, t.eval_iters * t.global_batch_size]
    train, valid, _ = _datasets(run, tokenizer, num_samples)
    if train is None:
        raise ValueError("the training dataset is empty: check --data-path / --split (the train share gets no "
                         "documents)")
    if run.iteration < run.train_iters and not t.skip_train:  # a finished run resumed has nothing left to read
        run.train_iter = _iterator(run, train, run.consumed_train_samples)
    run.valid_iter = _iterator(run, valid, run.consumed_valid_samples) if t.eval_iters > 0 else None
    # Every rank builds the same datasets, so every rank agrees on whether evaluation runs.
    run.has_valid = t.eval_iters > 0 and valid is not None and len(valid) > 0
    if t.eval_iters > 0 and not run.has_valid and run.state.rank == 0:
        log.warning("no validation data (check --split / --valid-data-path): evaluation is skipped")


def read_text(run: TrainingRun, iterator) -> torch.Tensor:
    """One microbatch's token ids ``[b, s + 1]`` on this rank's device. Every stage reads every microbatch
    (exit stages need the labels); tp rank 0 reads and broadcasts to its tp group."""
    state = run.state
    data = next(iterator) if state.tp_rank == 0 else None
    if data is not None:  # on the host copy: checking on the device would stall it every microbatch
        check_token_batch(torch.as_tensor(data["text"]), run.cfg.model.padded_vocab(state.tp))
    # The loader pins its batches when CUDA is present: the copy overlaps with queued kernels.
    return broadcast_data(["text"], data, state.tp_group, state.tp_ranks[0])["text"].to(state.device,
                                                                                     non_blocking=True)
