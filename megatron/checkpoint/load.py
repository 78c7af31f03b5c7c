"""``load_checkpoint`` (resume or fine-tune from Megatron's layout) and ``load_args_from_checkpoint``.

Loading reads this rank's own (tp, pp) file on every data-parallel rank, so a different dp size loads
(the distributed optimizer's shards are merged and cut anew); a different tp or pp size is refused with
the command that reshards the checkpoint. Every failure names the file or flag and the fix.
"""

from __future__ import annotations

import logging
import re
import os

import torch
import torch.distributed as dist

from megatron.checkpoint.layout import (
    DISTRIB_OPTIM_FILE,
    TRACKER_FILE,
    CheckpointError,
    checkpoint_file,
    iteration_dir,
    list_iterations,
    read_tracker,
    saved_mp_ranks,
)
from megatron.checkpoint.manifest import read_file, read_manifest
from megatron.checkpoint.model_dicts import fit_to_model, model_dicts
from megatron.checkpoint.optim_shards import reshard
from megatron.checkpoint.rng import restore_rng_states
from megatron.checkpoint.save import (
    CHECKPOINT_VERSION,
    PROGRESS_FIELDS,
    barrier,
    model_keys,
    resolve_full_pp,
    uses_distributed_optimizer,
)
from megatron.core.parallel_state import ParallelState

__all__ = ["load_checkpoint", "load_args_from_checkpoint", "resolve_iteration", "RESTORED_ARGS", "RESTORED_PARTS"]

log = logging.getLogger(__name__)

# --use-checkpoint-args: (name, force). Unforced names fill only a value the user left unset (None);
# forced ones always take the checkpoint's value. The early-exit names are forced as in EE-LLM
# (``load_args_from_checkpoint`` in its ``megatron/checkpointing.py``); exit_layer_temperature, rotary_base
# and norm_epsilon are restored too (EE-LLM dropped them, which silently changed a loaded model's numerics).
RESTORED_ARGS: tuple[tuple[str, bool], ...] = (
    ("num_layers", False), ("hidden_size", False), ("ffn_hidden_size", False), ("seq_length", False),
    ("num_attention_heads", False), ("num_query_groups", True), ("group_query_attention", True),
    ("kv_channels", False), ("max_position_embeddings", False), ("position_embedding_type", True),
    ("add_position_embedding", True), ("use_rotary_position_embeddings", True), ("rotary_percent", True),
    ("rotary_base", True), ("add_bias_linear", True), ("swiglu", True),
    ("untie_embeddings_and_output_weights", True), ("apply_layernorm_1p", True), ("normalization", True),
    ("norm_epsilon", True), ("tokenizer_type", False), ("padded_vocab_size", False),
    ("tensor_model_parallel_size", True), ("pipeline_model_parallel_size", True),
    ("virtual_pipeline_model_parallel_size", True), ("num_layers_per_virtual_pipeline_stage", False),
    ("make_vocab_size_divisible_by", True), ("exit_layer_nums", True), ("exit_layer_weight", True),
    ("use_exit_mlp", True), ("use_exit_block", True), ("use_exit_norm", True),
    ("untie_exit_output_weights", True), ("pre_exit", True), ("exit_layer_temperature", True),
)

# Our exit parts (name, the field saying the checkpoint has the part): taken from the checkpoint when it has
# the part, else left as the user gave them (EE-Tuning may add a part the checkpoint lacks: see _FRESH_PARTS).
RESTORED_PARTS: tuple[tuple[str, str], ...] = (
    ("use_exit_linear", "use_exit_linear"), ("exit_estimator", "exit_estimator"),
    ("exit_estimator_hidden", "exit_estimator"), ("exit_vocab_size", "exit_vocab_size"),
)

_RESHARD_TOOL = "tools/checkpoint/util.py"


def resolve_iteration(load_dir: str, load_iteration: int = 0, exit_on_missing_checkpoint: bool = False, *,
                      required: str | None = None, flag: str = "--load") -> tuple[int, bool] | None:
    """``(iteration, release)`` to load, or ``None`` when there is nothing (and that is allowed).

    ``load_iteration != 0`` skips the tracker (``--load-iteration``) and must name an existing iteration.
    Without a tracker, ``iter_*`` directories are refused by name (an interrupted first save, or a copied
    directory: starting from scratch would silently drop them). ``required``: why a checkpoint must exist
    (then a missing one is an error; ``exit_on_missing_checkpoint`` is that with the flag as the reason).
    ``flag``: the option naming ``load_dir`` in messages."""
    if load_iteration:
        if not os.path.isdir(iteration_dir(load_dir, load_iteration)):
            raise CheckpointError(f"--load-iteration {load_iteration}: {iteration_dir(load_dir, load_iteration)} "
                                  f"does not exist (iterations in {load_dir}: {list_iterations(load_dir)})")
        return load_iteration, False
    found = read_tracker(load_dir)
    if found is None:
        iterations = list_iterations(load_dir)
        if iterations:
            raise CheckpointError(f"{flag} {load_dir} has no {TRACKER_FILE}; name the iteration with --load-iteration "
                                  f"N (iterations found: {iterations}; a save killed before its first tracker "
                                  "leaves such a directory: delete it to start from scratch)")
        what = "does not exist" if not os.path.isdir(load_dir) else f"has no {TRACKER_FILE}"
        if exit_on_missing_checkpoint and required is None:
            required = "--exit-on-missing-checkpoint is set"
        if required is not None:
            raise CheckpointError(f"{flag} {load_dir} {what}, and {required}; point {flag} at a checkpoint "
                                  "directory")
        log.warning("%s %s %s; starting from scratch", flag, load_dir, what)
        return None
    iteration, release = found
    if not os.path.isdir(iteration_dir(load_dir, iteration, release)):
        raise CheckpointError(f"{load_dir}/{TRACKER_FILE} points at "
                              f"{iteration_dir(load_dir, iteration, release)}, which does not exist; choose "
                              f"another with --load-iteration N (found: {list_iterations(load_dir)})")
    return iteration, release


def _agree_on_iteration(iteration: int, release: bool) -> None:
    """Every rank must read the same iteration (a stale tracker on a node-local disk would mix models)."""
    if not dist.is_initialized():
        return
    code = -1 if release else iteration
    t = torch.tensor([code, -code], dtype=torch.int64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if t[0].item() != -t[1].item():
        raise CheckpointError(f"ranks read different checkpoint iterations (from {-t[1].item()} to {t[0].item()}, "
                              "-1 = release); the checkpoint directory must be on a file system every node sees")


def _parallel_mismatch(load_dir: str, saved_tp, saved_pp, state: ParallelState, full_pp: int) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {load_dir} was saved with --tensor-model-parallel-size {saved_tp} "
        f"--pipeline-model-parallel-size {saved_pp}, but this run uses {state.tp} and {full_pp}; reshard it first: "
        f"python {_RESHARD_TOOL} --model-type GPT --loader megatron --saver megatron --load-dir {load_dir} "
        f"--save-dir NEW_DIR --target-tensor-parallel-size {state.tp} --target-pipeline-parallel-size {full_pp}"
    )


def _saved_sizes(load_dir: str, iteration: int, release: bool) -> tuple[int | None, int | None]:
    """(tp, pp) a checkpoint was saved with: from the args of its tp 0 / pp 0 file, else from the directory
    names (only on the error path, so reading a second file costs nothing in a healthy run)."""
    try:
        saved_args = read_file(_rank0_file(load_dir, iteration, release)).get("args")
        return saved_args.tensor_model_parallel_size, saved_args.pipeline_model_parallel_size
    except (CheckpointError, AttributeError):
        names = saved_mp_ranks(load_dir, iteration, release)
        return (names[0], names[1] or 1) if names else (None, None)


def _read_rank_file(load_dir: str, iteration: int, release: bool, state: ParallelState,
                    full_pp: int) -> tuple[dict, str]:
    path = checkpoint_file(load_dir, iteration, state.tp_rank, state.pp_rank, full_pp, release)
    if not os.path.isfile(path):
        saved_tp, saved_pp = _saved_sizes(load_dir, iteration, release)
        if saved_tp is not None and (saved_tp, saved_pp) != (state.tp, full_pp):
            raise _parallel_mismatch(load_dir, saved_tp, saved_pp, state, full_pp)
        raise CheckpointError(f"checkpoint file {path} does not exist; the save of that iteration is incomplete")
    ckpt = read_file(path)
    saved_args = ckpt.get("args")
    saved_tp = getattr(saved_args, "tensor_model_parallel_size", None)
    saved_pp = getattr(saved_args, "pipeline_model_parallel_size", None)
    if (saved_tp, saved_pp) != (state.tp, full_pp) and None not in (saved_tp, saved_pp):
        raise _parallel_mismatch(load_dir, saved_tp, saved_pp, state, full_pp)
    version = ckpt.get("checkpoint_version")
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint_version {version!r}; only {CHECKPOINT_VERSION} is supported "
                              "(convert older Megatron checkpoints with tools/checkpoint/util.py)")
    return ckpt, path


# Exit parts of ours that a checkpoint may lack and that start well-defined without it: exit_linear is
# zero-initialised (the exit as it was), the estimator is always drawn from the model's seed, exit_vocab
# starts unfilled (-1). A model-only load (--finetune, --no-load-optim) keeps them, so EE-Tuning can add them.
_FRESH_PARTS = re.compile(r"(^|\.)(exit_linear|exit_estimator)\.|^exit_vocab$")


def _load_model(ckpt: dict, path: str, chunks: list, strict: bool, fresh_parts: bool = False) -> None:
    dicts = model_dicts(ckpt, path, len(chunks), "use the same --num-layers-per-virtual-pipeline-stage as the "
                                                 "saving run")
    for key, chunk, sd in zip(model_keys(len(chunks)), chunks, dicts):
        expected = set(chunk.state_dict())
        fresh = sorted(k for k in expected - set(sd) if _FRESH_PARTS.search(k)) if fresh_parts else []
        try:
            result = chunk.load_state_dict(fit_to_model(sd, expected), strict=strict and not fresh)
        except RuntimeError as e:
            raise CheckpointError(f"{path} [{key}] does not fit this model: {e}") from None
        if fresh:
            unexpected = sorted(result.unexpected_keys)
            missing = sorted(set(result.missing_keys) - set(fresh))
            if strict and (unexpected or missing):
                raise CheckpointError(f"{path} [{key}] does not fit this model: missing keys {missing[:6]}, "
                                      f"unexpected keys {unexpected[:6]}")
            log.info("%s [%s] has no %s: they keep their initialisation (exit_linear = identity map)", path, key,
                     ", ".join(sorted({re.sub(r"^.*?(exit_linear|exit_estimator|exit_vocab).*$", r"\1", k)
                                       for k in fresh})))


def _load_distributed_optimizer(optimizer, path: str, state: ParallelState) -> None:
    saved = read_file(path)
    shards = saved["shards"]
    if len(shards) == state.dp:
        optimizer.load_state_dict(shards[state.dp_rank])
        return
    slots = getattr(optimizer, "slots", None)
    if slots is None:
        raise CheckpointError(f"{path} was saved at data-parallel size {len(shards)}, this run has {state.dp}, and "
                              "the optimizer exposes no slots to reshard over; keep the dp size or --no-load-optim")
    has_copy = {s.index: s.has_copy for s in slots}
    optimizer.load_state_dict(reshard(shards, optimizer.state_dict(), has_copy))


def _load_optimizer(ckpt: dict, path: str, optimizer, scheduler, state: ParallelState, args) -> None:
    if optimizer is not None:
        saved = ckpt.get("optimizer")
        saved_distributed = isinstance(saved, dict) and saved.get("distributed") is True
        if saved is None:
            raise CheckpointError(f"{path} holds no optimizer state (saved with --no-save-optim); "
                                  "load it with --no-load-optim or --finetune")
        if saved_distributed != uses_distributed_optimizer(args):
            raise CheckpointError(
                f"{path} was saved {'with' if saved_distributed else 'without'} --use-distributed-optimizer and "
                "this run differs; use the same setting or skip the optimizer state with --no-load-optim")
        if saved_distributed:
            _load_distributed_optimizer(optimizer, os.path.join(os.path.dirname(path), DISTRIB_OPTIM_FILE), state)
        else:
            try:
                optimizer.load_state_dict(saved)
            except (KeyError, TypeError) as e:
                # Another program's optimizer state (EE-LLM / Megatron-LM keep apex's, in their own order).
                raise CheckpointError(
                    f"{path} holds an optimizer state this optimizer cannot read (no {e}; written by EE-LLM or "
                    "Megatron-LM?); load the model weights only with --finetune, or keep the iteration with "
                    "--no-load-optim") from None
    if scheduler is not None:
        if "opt_param_scheduler" not in ckpt:
            raise CheckpointError(f"{path} holds no opt_param_scheduler state; load it with --no-load-optim")
        scheduler.load_state_dict(ckpt["opt_param_scheduler"])


def _files_disagree(values: tuple, path: str) -> list[tuple]:
    """Every rank's (values, path); the distinct values with one file each when they are not all equal."""
    if not dist.is_initialized():
        return []
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, (values, path))
    first_file: dict[tuple, str] = {}
    for v, p in every:
        first_file.setdefault(v, p)
    return sorted(first_file.items()) if len(first_file) > 1 else []


def _restore_progress(ckpt: dict, path: str, manifest: dict | None, args) -> None:
    """Consumed samples and FLOPs so far onto ``args`` (as Megatron keeps them), the same on every rank.

    The iteration's manifest holds the one authoritative value (written by the run that saved it; the files
    of stages a partial EE-Tuning save copied carry the counters of the run they came from). Without one
    (older checkpoints, EE-LLM's), each rank reads its own file and the ranks must agree (collective), else
    the stages would pair different data."""
    if manifest is not None and "progress" in manifest:
        values = {name: manifest["progress"].get(name, 0) for name in PROGRESS_FIELDS}
    else:
        saved_args = ckpt.get("args")
        values = {name: getattr(saved_args, name, 0) for name in PROGRESS_FIELDS[:2]}
        values[PROGRESS_FIELDS[2]] = ckpt.get(PROGRESS_FIELDS[2], 0)
        differ = _files_disagree((values["consumed_train_samples"], values["consumed_valid_samples"]), path)
        if differ:
            listed = "; ".join(f"{p}: {train} train / {valid} valid" for (train, valid), p in differ)
            raise CheckpointError(
                f"the checkpoint's files disagree on the consumed samples ({listed}), so the pipeline stages would "
                "read different data (a partial EE-Tuning save by an older version copies the stages it did not "
                "build with their own counters); load the weights with --finetune, or restore the files of one run")
    for name, value in values.items():
        setattr(args, name, value)


def load_checkpoint(load_dir: str, model_chunks, optimizer, scheduler, state: ParallelState, args, *,
                    full_pp: int | None = None, rng_tracker=None, load_iteration: int = 0, finetune: bool = False,
                    no_load_optim: bool = False, no_load_rng: bool = False,
                    exit_on_missing_checkpoint: bool = False, strict: bool = True) -> int:
    """Load into ``model_chunks`` / ``optimizer`` / ``scheduler`` / RNG (collective over the world).

    Returns the iteration to continue from: the saved one, or 0 with ``finetune``, for a ``release``
    checkpoint, or when there is no checkpoint (unless ``exit_on_missing_checkpoint``). ``finetune`` and
    ``release`` load the model only. Without loaded optimizer state the optimizer's fp32 masters are
    refreshed from the loaded weights (``reload_model_params``). Restores ``args.consumed_train_samples``,
    ``consumed_valid_samples`` and ``num_floating_point_operations_so_far`` unless fine-tuning."""
    full_pp = resolve_full_pp(full_pp, state)
    found = resolve_iteration(load_dir, load_iteration, exit_on_missing_checkpoint)
    if found is None:
        return 0
    iteration, release = found
    _agree_on_iteration(iteration, release)
    ckpt, path = _read_rank_file(load_dir, iteration, release, state, full_pp)
    model_only = release or finetune
    _load_model(ckpt, path, list(model_chunks), strict, fresh_parts=model_only or no_load_optim)
    if not finetune:
        _restore_progress(ckpt, path, read_manifest(iteration_dir(load_dir, iteration, release)), args)
    if not model_only and not no_load_optim:
        _load_optimizer(ckpt, path, optimizer, scheduler, state, args)
    elif optimizer is not None and hasattr(optimizer, "reload_model_params"):
        optimizer.reload_model_params()
    if not model_only and not no_load_rng:
        if "rng_state" not in ckpt:
            raise CheckpointError(f"{path} holds no rng_state (saved with --no-save-rng); resume with --no-load-rng")
        restore_rng_states(ckpt["rng_state"], state.dp_rank, rng_tracker, path)
    barrier()
    log.info("loaded %s iteration %s from %s", "release" if release else "checkpoint", iteration, load_dir)
    return 0 if model_only else iteration


def _rank0_file(load_dir: str, iteration: int, release: bool) -> str:
    """The tp 0 / pp 0 file, whichever name it has (the pipeline size is not known yet)."""
    for full_pp in (1, 2):
        path = checkpoint_file(load_dir, iteration, 0, 0, full_pp, release)
        if os.path.isfile(path):
            return path
    raise CheckpointError(f"{iteration_dir(load_dir, iteration, release)} has no mp_rank_00 or mp_rank_00_000 "
                          "model file; --use-checkpoint-args needs a complete checkpoint")


def load_args_from_checkpoint(args, load_dir: str, load_iteration: int = 0):
    """``--use-checkpoint-args``: copy the model-shape and early-exit arguments of the checkpoint in
    ``load_dir`` into ``args`` (see :data:`RESTORED_ARGS`) and return ``args``. Runs before any process
    group exists, so it reads the tp 0 / pp 0 file directly."""
    found = resolve_iteration(load_dir, load_iteration, exit_on_missing_checkpoint=True)
    iteration, release = found
    path = _rank0_file(load_dir, iteration, release)
    saved = read_file(path).get("args")
    if saved is None:
        raise CheckpointError(f"{path} holds no args; --use-checkpoint-args needs a checkpoint saved with its args")
    for name, force in RESTORED_ARGS:
        if not hasattr(saved, name):
            continue
        if force or getattr(args, name, None) is None:
            value = getattr(saved, name)
            setattr(args, name, list(value) if isinstance(value, (list, tuple)) else value)
    for name, present in RESTORED_PARTS:
        if getattr(saved, present, False):
            setattr(args, name, getattr(saved, name))
    return args
