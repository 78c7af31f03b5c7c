"""Tensor parallelism: communication mappings, parallel layers, vocab-parallel cross entropy, RNG streams
and activation checkpointing, plus the pure sharding helpers checkpoint tools share with the layers."""

from .cross_entropy import vocab_parallel_cross_entropy
from .layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    allreduce_sequence_parallel_grads,
    gather_full_tensor,
    linear,
)
from .mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from .random import MODEL_PARALLEL_RNG, RNGStatesTracker, checkpoint, model_parallel_seed
from .utils import divide, pad_vocab_size, shard_tensor, unshard_tensors, vocab_range

__all__ = [
    "gather_full_tensor",
    "linear",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "allreduce_sequence_parallel_grads",
    "vocab_parallel_cross_entropy",
    "copy_to_tensor_model_parallel_region",
    "reduce_from_tensor_model_parallel_region",
    "scatter_to_tensor_model_parallel_region",
    "gather_from_tensor_model_parallel_region",
    "scatter_to_sequence_parallel_region",
    "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "RNGStatesTracker",
    "MODEL_PARALLEL_RNG",
    "model_parallel_seed",
    "checkpoint",
    "shard_tensor",
    "unshard_tensors",
    "pad_vocab_size",
    "vocab_range",
    "divide",
]
