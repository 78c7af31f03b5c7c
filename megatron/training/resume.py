"""Checkpoint wiring of a training run: load before training, save during and after it.

``load_run`` restores model, optimizer, scheduler, RNG streams and the run's progress (iteration and
consumed-sample counts, onto :class:`~megatron.training.setup.TrainingRun`; ``--load``, ``--finetune``,
``--no-load-optim``, ``--no-load-rng``, ``--load-iteration``, ``--exit-on-missing-checkpoint``).
``save_run`` writes one iteration atomically (the checkpoint package's ordering) with the run's ``args``,
into which it first writes the progress (Megatron's checkpoints keep it there).

``--tune-exit`` refuses to start without a checkpoint to tune (the exits would learn a random backbone).
With ``--tune-exit-pipeline-parallel-size k < pp`` it builds and loads only the first ``k`` stages. A
save must still be a complete model, so before the tracker moves, the files of the stages this run never
built are copied unchanged from the loaded checkpoint into the new iteration (EE-LLM saved only the
tuned stages and left the reassembly to the user); the iteration's manifest lists their checksums and
this run's progress, which a later load takes for every stage.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil

from megatron.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from megatron.checkpoint.layout import atomic_write, is_temporary, iteration_dir, rank_dir
from megatron.checkpoint.load import resolve_iteration
from megatron.checkpoint.manifest import sha256_file
from megatron.checkpoint.save import PROGRESS_FIELDS
from megatron.training.setup import TrainingRun

__all__ = ["load_run", "save_run", "copy_unbuilt_stages", "PROGRESS"]

# The run's progress as Megatron's checkpoints keep it on args (the checkpoint package's counters and the
# iteration); TrainingRun holds it while training.
PROGRESS = ("iteration", *PROGRESS_FIELDS)

log = logging.getLogger(__name__)


def load_run(run: TrainingRun) -> int:
    """Load ``--load`` into the run (collective); sets the run's progress and returns ``run.iteration``."""
    c = run.cfg.checkpoint
    args = run.args
    run.iteration = run.consumed_train_samples = run.consumed_valid_samples = run.flops_so_far = 0
    if c.load is None:
        return 0
    if run.cfg.training.tune_exit:
        # A tuning run needs its checkpoint. Remember which one the unbuilt stages come from, for every later
        # save, and check now (on every rank) that it has them rather than failing in the middle of a save.
        run.source_iteration = resolve_iteration(c.load, c.load_iteration,
                                                 required="--tune-exit tunes the exits of a pretrained model")
        if run.partial_stages:
            _unbuilt_stage_dirs(c.load, run.source_iteration, run.state.tp, run.state.pp, run.cfg.parallel.pp)
    # The checkpoint package restores the saved progress onto the Namespace it is given (Megatron keeps it
    # on args); a copy without progress takes it, so a fine-tune (which restores none) starts from zero.
    loaded = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in PROGRESS})
    run.iteration = load_checkpoint(
        c.load, run.chunks, run.optimizer, run.scheduler, run.state, loaded, full_pp=run.cfg.parallel.pp,
        rng_tracker=run.rng_tracker, load_iteration=c.load_iteration, finetune=c.finetune,
        no_load_optim=c.no_load_optim, no_load_rng=c.no_load_rng,
        exit_on_missing_checkpoint=c.exit_on_missing_checkpoint)
    run.consumed_train_samples = getattr(loaded, "consumed_train_samples", 0)
    run.consumed_valid_samples = getattr(loaded, "consumed_valid_samples", 0)
    run.flops_so_far = getattr(loaded, "num_floating_point_operations_so_far", 0)
    return run.iteration


def _copy_file(src: str, dst: str) -> dict:
    """Copy through a temporary name renamed into place (a reader never sees a torn file); its digest."""
    def copy(out):
        with open(src, "rb") as f:
            shutil.copyfileobj(f, out, 16 << 20)
    return atomic_write(dst, copy)


def _unbuilt_stage_dirs(load_dir: str, source: tuple[int, bool], tp: int, built_pp: int,
                        full_pp: int) -> list[tuple[int, int, str]]:
    """``(stage, tp_rank, directory)`` of every stage ``built_pp .. full_pp - 1`` in checkpoint ``source``."""
    src_iter, release = source
    dirs = []
    for stage in range(built_pp, full_pp):
        for tp_rank in range(tp):
            src = rank_dir(load_dir, src_iter, tp_rank, stage, full_pp, release)
            if not os.path.isdir(src):
                raise CheckpointError(f"{src} is missing: with --tune-exit-pipeline-parallel-size {built_pp} a save "
                                      f"copies the stages this run does not build from --load {load_dir}, which "
                                      "must hold the whole model")
            dirs.append((stage, tp_rank, src))
    return dirs


def copy_unbuilt_stages(load_dir: str, source: tuple[int, bool], save_dir: str, iteration: int, tp: int,
                        built_pp: int, full_pp: int) -> dict[str, dict]:
    """Copy every file of stages ``built_pp .. full_pp - 1`` of checkpoint ``source`` (iteration,
    release) in ``load_dir`` into iteration ``iteration`` of ``save_dir`` (not the temporaries of killed
    saves); returns their digests by path relative to the new iteration directory (for its manifest)."""
    copied = {}
    target = iteration_dir(save_dir, iteration)
    for stage, tp_rank, src in _unbuilt_stage_dirs(load_dir, source, tp, built_pp, full_pp):
        dst = rank_dir(save_dir, iteration, tp_rank, stage, full_pp)
        for name in sorted(os.listdir(src)):
            if not is_temporary(name) and os.path.isfile(os.path.join(src, name)):
                copied[os.path.relpath(os.path.join(dst, name), target)] = _copy_file(
                    os.path.join(src, name), os.path.join(dst, name))
    return copied


def _digests_in_place(load_dir: str, source: tuple[int, bool], tp: int, built_pp: int,
                      full_pp: int) -> dict[str, dict]:
    """Digests of the unbuilt stages' files already in ``source``'s directory (for its new manifest)."""
    target = iteration_dir(load_dir, *source)
    out = {}
    for _, _, src in _unbuilt_stage_dirs(load_dir, source, tp, built_pp, full_pp):
        for name in sorted(os.listdir(src)):
            path = os.path.join(src, name)
            if not is_temporary(name) and os.path.isfile(path):
                digest, size = sha256_file(path)
                out[os.path.relpath(path, target)] = {"sha256": digest, "bytes": size}
    return out


def save_run(run: TrainingRun) -> None:
    """Save ``run.iteration`` to ``--save`` (collective)."""
    c = run.cfg.checkpoint
    args = run.args
    args.iteration = run.iteration
    args.consumed_train_samples, args.consumed_valid_samples = run.consumed_train_samples, run.consumed_valid_samples
    args.num_floating_point_operations_so_far = run.flops_so_far
    copied = {}
    if run.partial_stages and run.state.rank == 0:
        sizes = (run.state.tp, run.state.pp, run.cfg.parallel.pp)
        source_dir = os.path.abspath(iteration_dir(c.load, *run.source_iteration))
        if source_dir != os.path.abspath(iteration_dir(c.save, run.iteration)):
            copied = copy_unbuilt_stages(c.load, run.source_iteration, c.save, run.iteration, *sizes)
        else:  # saving over the loaded iteration: its unbuilt stages' files are already in place
            copied = _digests_in_place(c.load, run.source_iteration, *sizes)
    # Rank 0 finishes the copies before it enters save_checkpoint, whose gather precedes the tracker move.
    save_checkpoint(c.save, run.iteration, run.chunks, run.optimizer, run.scheduler, run.state, args,
                    full_pp=run.cfg.parallel.pp, rng_tracker=run.rng_tracker, save_optim=not c.no_save_optim,
                    save_rng=not c.no_save_rng, copied_files=copied)
    run.last_saved = run.iteration
