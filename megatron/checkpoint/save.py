"""``save_checkpoint``: write one iteration in Megatron's layout, atomically.

Order of a save (every rank calls it together):

1. collectives: the RNG states of the dp group and, with the distributed optimizer, its state shards are
   gathered on data-parallel rank 0 of each (tp, pp) coordinate;
2. dp rank 0 of each (tp, pp) writes ``model_optim_rng.pt`` (and ``distrib_optim.pt``), each through a
   temporary file renamed into place, hashing the bytes as they are written;
3. the digests are gathered on global rank 0 (a collective: past it, every file of the iteration is
   complete);
4. global rank 0 writes the iteration's manifest (digests and progress, ``manifest.py``), moves the
   tracker file (temporary file + ``os.replace``) and, while every other rank waits at the last barrier
   with nothing left to write, removes the temporary files killed saves left in the save directory.

A process killed anywhere before step 4 leaves the tracker on the previous iteration, whose files were
never touched (a new iteration has its own directory), so the latest checkpoint stays loadable.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch.distributed as dist

from megatron.checkpoint.layout import (
    DISTRIB_OPTIM_FILE,
    atomic_save,
    checkpoint_file,
    iteration_dir,
    remove_stale_temporaries,
    write_tracker,
)
from megatron.checkpoint.manifest import read_manifest, write_manifest
from megatron.checkpoint.optim_shards import gather_shards, to_cpu
from megatron.checkpoint.rng import capture_rng_states, gather_rng_states
from megatron.core.parallel_state import ParallelState

__all__ = ["save_checkpoint", "CHECKPOINT_VERSION", "model_keys", "uses_distributed_optimizer", "barrier",
           "resolve_full_pp", "progress_of", "PROGRESS_FIELDS"]

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 3.0
# The run's counters a checkpoint carries (on ``args``, as Megatron keeps them, and in the manifest).
PROGRESS_FIELDS = ("consumed_train_samples", "consumed_valid_samples", "num_floating_point_operations_so_far")


def progress_of(args) -> dict:
    return {name: getattr(args, name, 0) for name in PROGRESS_FIELDS}


def model_keys(num_chunks: int) -> list[str]:
    """``model`` for one chunk, ``model0, model1, ...`` for virtual-pipeline chunks (Megatron's keys)."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def uses_distributed_optimizer(args) -> bool:
    return bool(getattr(args, "use_distributed_optimizer", False))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _stored_args(args, state: ParallelState, full_pp: int) -> argparse.Namespace:
    """A copy of ``args`` whose parallel sizes are the ones the files were actually written with (the load
    check reads them, so they must not drift from the directory names)."""
    stored = argparse.Namespace(**vars(args))
    stored.tensor_model_parallel_size = state.tp
    stored.pipeline_model_parallel_size = full_pp
    stored.data_parallel_size = state.dp
    return stored


def resolve_full_pp(full_pp: int | None, state: ParallelState) -> int:
    full_pp = state.pp if full_pp is None else full_pp
    if full_pp < state.pp:
        raise ValueError(f"full_pp ({full_pp}) must be >= the pipeline stages that run ({state.pp}); pass "
                         "--pipeline-model-parallel-size of the whole model")
    return full_pp


def _gather_digests(local: dict[str, dict]) -> dict[str, dict]:
    """Every rank's ``{relative path: digest}`` merged (collective over the world)."""
    if not dist.is_initialized():
        return dict(local)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return {path: digest for part in parts for path, digest in part.items()}


def save_checkpoint(save_dir: str, iteration: int, model_chunks, optimizer, scheduler, state: ParallelState,
                    args, *, full_pp: int | None = None, rng_tracker=None, save_optim: bool = True,
                    save_rng: bool = True, copied_files: dict[str, dict] | None = None) -> None:
    """Save ``iteration`` under ``save_dir`` (collective: every rank of the world calls it).

    ``model_chunks``: this rank's modules (several with a virtual pipeline); their ``state_dict()`` is the
    per-rank Megatron ``model`` dict. ``optimizer`` / ``scheduler``: anything with ``state_dict()`` (or
    ``None``). ``full_pp``: pipeline size of the whole model (EE-Tuning runs fewer stages; default
    ``state.pp``). ``args``: the run's Megatron-named Namespace, stored as ``args``. ``copied_files``
    (global rank 0): digests of files already placed in the iteration directory by the caller (the stages
    a partial EE-Tuning run copies), by path relative to it, for the manifest."""
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    full_pp = resolve_full_pp(full_pp, state)
    chunks = list(model_chunks)
    distributed = save_optim and optimizer is not None and uses_distributed_optimizer(args)

    rng_states = gather_rng_states(capture_rng_states(rng_tracker), state.dp_group) if save_rng else None
    shards = gather_shards(to_cpu(optimizer.state_dict()), state.dp_group, state.dp_ranks) if distributed else None

    written: dict[str, dict] = {}
    target = iteration_dir(save_dir, iteration)
    if state.dp_rank == 0:
        ckpt = {
            "args": _stored_args(args, state, full_pp),
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": iteration,
            "num_floating_point_operations_so_far": getattr(args, "num_floating_point_operations_so_far", 0),
        }
        for key, chunk in zip(model_keys(len(chunks)), chunks):
            ckpt[key] = chunk.state_dict()
        if save_optim:
            # With the distributed optimizer the state lives in distrib_optim.pt; the key stays so a
            # plain-optimizer run can tell "saved distributed" from "saved without optimizer".
            if optimizer is not None:
                ckpt["optimizer"] = {"distributed": True} if distributed else optimizer.state_dict()
            if scheduler is not None:
                ckpt["opt_param_scheduler"] = scheduler.state_dict()
        if rng_states is not None:
            ckpt["rng_state"] = rng_states
        path = checkpoint_file(save_dir, iteration, state.tp_rank, state.pp_rank, full_pp)
        if distributed:
            optim_path = checkpoint_file(save_dir, iteration, state.tp_rank, state.pp_rank, full_pp,
                                         filename=DISTRIB_OPTIM_FILE)
            written[os.path.relpath(optim_path, target)] = atomic_save({"dp": state.dp, "shards": shards},
                                                                       optim_path)
        written[os.path.relpath(path, target)] = atomic_save(ckpt, path)

    digests = _gather_digests(written)  # every file of this iteration is complete past this point
    if not dist.is_initialized() and state.dp_rank == 0:
        # Ranks played one after another in one process (tools, tests): each adds its files.
        previous = read_manifest(target)
        digests = {**(previous["files"] if previous else {}), **digests}
        if state.rank != 0:
            write_manifest(target, digests, progress_of(args))
    if state.rank == 0:
        write_manifest(target, {**(copied_files or {}), **digests}, progress_of(args))
        write_tracker(save_dir, iteration)
        log.info("saved checkpoint at iteration %d to %s", iteration, save_dir)
        # Every other rank waits at the barrier below with its files written: nothing is being written
        # into save_dir now, so the temporaries left there are those of killed saves.
        remove_stale_temporaries(save_dir)
    barrier()
