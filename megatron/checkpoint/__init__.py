"""Checkpoints in Megatron's layout: atomic save, resume / fine-tune load, ``--use-checkpoint-args``.

``layout`` (names, tracker, atomic writes, guarded reads), ``rng`` (generator states), ``optim_shards``
(distributed-optimizer shards), ``save`` and ``load``. Import the public API from here.
"""

from megatron.checkpoint.layout import CheckpointError, checkpoint_file, read_tracker
from megatron.checkpoint.load import load_args_from_checkpoint, load_checkpoint
from megatron.checkpoint.save import CHECKPOINT_VERSION, save_checkpoint

__all__ = [
    "CheckpointError", "CHECKPOINT_VERSION", "checkpoint_file", "read_tracker", "save_checkpoint",
    "load_checkpoint", "load_args_from_checkpoint",
]
