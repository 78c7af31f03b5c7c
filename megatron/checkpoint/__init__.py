"""Checkpoints in Megatron's layout: atomic, checksummed save, resume / fine-tune load, ``--use-checkpoint-args``.

``layout`` (names, tracker, atomic writes), ``manifest`` (per-iteration checksums and progress, the verified
read), ``model_dicts`` (our flat and EE-LLM's nested model dicts), ``rng`` (generator states),
``optim_shards`` (distributed-optimizer shards), ``save`` and ``load``; ``model_loader`` builds the model of
a rank from flags and a checkpoint (import it from its module). Import the public API from here.
"""

from megatron.checkpoint.layout import CheckpointError, checkpoint_file, read_tracker
from megatron.checkpoint.load import load_args_from_checkpoint, load_checkpoint
from megatron.checkpoint.manifest import read_file
from megatron.checkpoint.save import CHECKPOINT_VERSION, save_checkpoint

__all__ = [
    "CheckpointError", "CHECKPOINT_VERSION", "checkpoint_file", "read_tracker", "save_checkpoint",
    "load_checkpoint", "load_args_from_checkpoint", "read_file",
]
