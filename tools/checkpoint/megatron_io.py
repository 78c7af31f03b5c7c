"""Megatron / EE-LLM checkpoint directories <-> one in-memory :class:`ModelCheckpoint` (the FULL state dict).

Reading takes every ``mp_rank_*`` file of one iteration, flattens Megatron's nested ``model`` dicts
(``{'language_model': {'encoder': {...}}}`` in EE-LLM / legacy Megatron, flat in ours) to the dotted key
names with the reader training's ``--load`` uses (``megatron/checkpoint/model_dicts.py``), and merges the
ranks with :func:`merge_state_dicts` (which checks every key, shape and tied copy). The model and exit
configuration come from the stored ``args``.

Writing cuts the FULL dict for any (tp, pp, vpp, layers per stage) with :func:`shard_state_dict` and
writes model-only files (``args``, ``checkpoint_version``, ``iteration``, ``model`` / ``model<i>``), the
way Megatron's converter does: no optimizer or RNG state, so a training run loads them with ``--finetune``
(or ``--no-load-optim --no-load-rng``). Files go through the training code's atomic writer.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Mapping

import torch

from megatron.checkpoint.foreign_pickle import ForeignObject
from megatron.checkpoint.layout import (
    CheckpointError,
    atomic_save,
    checkpoint_file,
    iteration_dir,
    list_iterations,
    saved_mp_ranks,
    write_tracker,
)
from megatron.checkpoint.load import resolve_iteration
from megatron.checkpoint.manifest import read_file, write_manifest
from megatron.checkpoint.model_dicts import model_dicts
from megatron.checkpoint.save import CHECKPOINT_VERSION, model_keys, progress_of
from megatron.config import ConfigError, EarlyExitConfig, ModelConfig
from megatron.model.partition import Partition, partition
from megatron.model.state_dict_sharding import merge_state_dicts, shard_state_dict

__all__ = [
    "Layout", "ModelCheckpoint", "configs_from_checkpoint_args", "layout_from_args", "build_args",
    "update_args", "read_megatron", "write_megatron",
]

# Fields that do not change a single weight; a conversion config drops them so that a checkpoint saved with
# e.g. --sequence-parallel at tp 8 still validates at tp 1.
_NEUTRAL_MODEL_FIELDS = dict(sequence_parallel=False, recompute_granularity=None, recompute_method=None,
                             recompute_num_layers=None)


@dataclass(frozen=True)
class Layout:
    """How a checkpoint is cut: tensor / pipeline sizes, virtual chunks per stage and the stage split."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    layers_per_stage: tuple[int, ...] | None = None

    def partition(self, cfg: ModelConfig, ee: EarlyExitConfig) -> Partition:
        return partition(cfg.num_layers, self.pp, self.vpp, ee.exit_layer_nums, self.layers_per_stage)


@dataclass
class ModelCheckpoint:
    """A whole model in memory: the FULL state dict, its configs, its layout and where it came from.

    ``args``: the stored Megatron Namespace (None for HF / GGUF sources). ``tokenizer``: Megatron tokenizer
    args (``tokenizer_type``, ``tokenizer_model``, ...) to record in saved args. ``tokenizer_files``: file
    name -> text of a tokenizer to write beside the saved model (GGUF sources)."""

    full: dict[str, torch.Tensor]
    model: ModelConfig
    ee: EarlyExitConfig
    layout: Layout = field(default_factory=Layout)
    args: argparse.Namespace | None = None
    iteration: int = 1
    release: bool = False
    tokenizer: dict = field(default_factory=dict)
    tokenizer_files: dict[str, str] = field(default_factory=dict)


def _picked(cls, args: argparse.Namespace, **overrides) -> dict:
    values = {}
    for f in dataclasses.fields(cls):
        value = overrides[f.name] if f.name in overrides else getattr(args, f.name, None)
        if value is not None:
            values[f.name] = list(value) if isinstance(value, (list, tuple)) else value
    return values


def configs_from_checkpoint_args(args: argparse.Namespace) -> tuple[ModelConfig, EarlyExitConfig]:
    """(ModelConfig, EarlyExitConfig) of a stored Namespace (ours, EE-LLM's or plain Megatron's).

    EE-LLM's Llama / GPT args have no ``vocab_size`` (the tokenizer gives it): the padded size is used."""
    padded = getattr(args, "padded_vocab_size", None)
    vocab = getattr(args, "vocab_size", None) or padded
    if vocab is None:
        raise CheckpointError("the checkpoint's args hold neither vocab_size nor padded_vocab_size; it cannot be "
                              "converted without knowing the embedding size")
    groups = args.num_query_groups if getattr(args, "group_query_attention", False) else None
    model = ModelConfig(**_picked(ModelConfig, args, vocab_size=vocab, padded_vocab_size=padded,
                                  num_query_groups=groups, **_NEUTRAL_MODEL_FIELDS))
    ee = EarlyExitConfig(**_picked(EarlyExitConfig, args))
    try:
        model.validate()
        ee.validate(model.num_layers)
    except ConfigError as e:
        raise CheckpointError(f"the checkpoint's args describe an invalid model: {e}") from None
    return model, ee


def layout_from_args(args: argparse.Namespace) -> Layout:
    vpp = getattr(args, "virtual_pipeline_model_parallel_size", None) or 1
    split = getattr(args, "layers_per_stage", None)
    return Layout(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, vpp,
                  tuple(split) if split else None)


def update_args(args: argparse.Namespace, cfg: ModelConfig, ee: EarlyExitConfig, layout: Layout,
                tokenizer: Mapping | None = None) -> argparse.Namespace:
    """A copy of ``args`` describing ``cfg`` / ``ee`` cut as ``layout`` (the fields a checkpoint load reads)."""
    # Placeholders of foreign classes (see ForeignObject) cannot be pickled again; nothing here reads them.
    out = argparse.Namespace(**{k: v for k, v in vars(args).items() if not isinstance(v, ForeignObject)})
    for section in (cfg, ee):
        for f in dataclasses.fields(section):
            if f.name in _NEUTRAL_MODEL_FIELDS:
                continue
            value = getattr(section, f.name)
            setattr(out, f.name, list(value) if isinstance(value, list) else value)
    out.group_query_attention = cfg.num_query_groups is not None
    out.num_query_groups = cfg.num_query_groups or 1
    out.tensor_model_parallel_size, out.pipeline_model_parallel_size = layout.tp, layout.pp
    out.virtual_pipeline_model_parallel_size = layout.vpp if layout.vpp > 1 else None
    counts = layout.layers_per_stage or (cfg.num_layers // layout.pp,) * layout.pp
    out.num_layers_per_virtual_pipeline_stage = counts[0] // layout.vpp if layout.vpp > 1 else None
    out.layers_per_stage = list(layout.layers_per_stage) if layout.layers_per_stage else None
    dp = getattr(out, "data_parallel_size", None) or 1
    out.world_size = layout.tp * layout.pp * dp
    for name, value in (tokenizer or {}).items():
        setattr(out, name, value)
    return out


def build_args(cfg: ModelConfig, ee: EarlyExitConfig, layout: Layout, tokenizer: Mapping | None = None
               ) -> argparse.Namespace:
    """A complete, validated Namespace (every flag at its default) for a model imported from HF / GGUF."""
    from megatron.arguments import parse_args, resolve

    args = update_args(parse_args([]), cfg, ee, layout, tokenizer)
    args.data_parallel_size = 1
    args.global_batch_size = args.micro_batch_size  # a placeholder the training run sets
    try:
        resolve(args, world_size=layout.tp * layout.pp, training=False, vocab_size=cfg.vocab_size)
        return args
    except ConfigError as e:
        raise ConfigError(f"the converted model does not fit the target layout: {e}") from None


# ------------------------------------------------------------------------------------------------- read

def read_megatron(load_dir: str, load_iteration: int = 0) -> ModelCheckpoint:
    """Every rank file of one iteration (``load_iteration`` 0: the tracker's) merged into the FULL dict."""
    if not os.path.isdir(load_dir):
        what = "is a file, not a checkpoint directory" if os.path.exists(load_dir) else "does not exist"
        raise CheckpointError(f"--load-dir {load_dir} {what}")
    iteration, release = resolve_iteration(load_dir, load_iteration, required="the converter needs a checkpoint",
                                           flag="--load-dir")
    first = _first_file(load_dir, iteration, release)
    cache = {first: read_file(first)}
    args = cache[first].get("args")
    if args is None:
        raise CheckpointError(f"{first} holds no args; the converter reads the model shape from them")
    cfg, ee = configs_from_checkpoint_args(args)
    layout = layout_from_args(args)
    part = layout.partition(cfg, ee)
    per_rank = {}
    for stage in range(layout.pp):
        for tp_rank in range(layout.tp):
            path = checkpoint_file(load_dir, iteration, tp_rank, stage, layout.pp, release)
            if not os.path.isfile(path):
                raise CheckpointError(
                    f"{path} is missing: the checkpoint was saved with tp={layout.tp}, pp={layout.pp} and every rank "
                    "file is needed (an EE-LLM partial EE-Tuning save holds only the tuned stages; convert the "
                    "complete model)")
            ckpt = cache.pop(path, None) or read_file(path)
            hint = f"its args say {layout.vpp} virtual chunk(s) per stage"
            for chunk, sd in enumerate(model_dicts(ckpt, path, layout.vpp, hint)):
                per_rank[tp_rank, stage, chunk] = sd
    full = merge_state_dicts(per_rank, cfg, layout.tp, part, ee)
    tokenizer = {k: getattr(args, k) for k in ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file")
                 if getattr(args, k, None) is not None}
    return ModelCheckpoint(full, cfg, ee, layout, args, iteration, release, tokenizer)


def _first_file(load_dir: str, iteration: int, release: bool) -> str:
    """The tp 0 / pp 0 file (named with ``_000`` when the pipeline size, not yet known, is above 1)."""
    sizes = saved_mp_ranks(load_dir, iteration, release)
    if sizes is None:
        raise CheckpointError(f"{iteration_dir(load_dir, iteration, release)} has no mp_rank_* directories "
                              f"(iterations found: {list_iterations(load_dir)})")
    return checkpoint_file(load_dir, iteration, 0, 0, sizes[1] or 1, release)


# ------------------------------------------------------------------------------------------------ write


def _compact(t: torch.Tensor) -> torch.Tensor:
    """A tensor that owns exactly its bytes: torch.save writes a view's whole storage otherwise."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def write_megatron(save_dir: str, ckpt: ModelCheckpoint, layout: Layout, args: argparse.Namespace) -> None:
    """Write ``ckpt.full`` cut as ``layout`` under ``save_dir`` at ``ckpt.iteration`` (or ``release``),
    with ``args`` (already describing the model and layout) in every file; the manifest (checksums) and the
    tracker go last."""
    cfg, ee = ckpt.model, ckpt.ee
    part = layout.partition(cfg, ee)
    try:  # every size check of the cut, before the first file is written
        cfg.validate(layout.tp)
    except ConfigError as e:
        raise ConfigError(f"cannot cut the model for --target-tensor-parallel-size {layout.tp}: {e}") from None
    target = iteration_dir(save_dir, ckpt.iteration, ckpt.release)
    if os.path.exists(target):
        raise CheckpointError(f"--save-dir {save_dir} already holds {os.path.basename(target)}; choose a new "
                              "directory (stale rank files of another layout would mix with the new ones)")
    digests = {}
    for stage in range(layout.pp):
        for tp_rank in range(layout.tp):
            entry = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": ckpt.iteration}
            for chunk, key in enumerate(model_keys(layout.vpp)):
                sd = shard_state_dict(ckpt.full, cfg, layout.tp, tp_rank, part, stage, chunk, ee)
                entry[key] = {k: _compact(v) for k, v in sd.items()}
            path = checkpoint_file(save_dir, ckpt.iteration, tp_rank, stage, layout.pp, ckpt.release)
            digests[os.path.relpath(path, target)] = atomic_save(entry, path)
    write_manifest(target, digests, progress_of(args))
    write_tracker(save_dir, "release" if ckpt.release else ckpt.iteration)
