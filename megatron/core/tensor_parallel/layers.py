"""Tensor-parallel layers: ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding.

Initialisation is layout-independent: a layer fills the FULL weight (fp32, on the layer's device) with
``init_method`` and keeps its own shard, so one init_method gives the same full model for every tp.
``init_method=None`` means zeros; ``uninitialized`` allocates only the shard, uninitialised (a strict
checkpoint load overwrites it right after: nothing is drawn, no full weight exists).

Every sharded parameter carries Megatron's attributes ``tensor_model_parallel``, ``partition_dim`` and
``partition_stride``; a parameter whose gradient is only partial on each tp rank under sequence
parallelism (RowParallelLinear's bias) carries ``sequence_parallel = True`` and needs
:func:`allreduce_sequence_parallel_grads` (or the equivalent in the grad-sync code) after backward.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron.core.parallel_state import ParallelState

from .mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from .range_checks import check_index_range
from .utils import divide, shard_tensor, unshard_tensors, vocab_range

__all__ = [
    "uninitialized",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "allreduce_sequence_parallel_grads",
    "gather_full_tensor",
    "linear",
]

InitMethod = Optional[Callable[[torch.Tensor], object]]


def uninitialized(w: torch.Tensor) -> torch.Tensor:
    """The init method that leaves a weight as allocated (a marker, compared by identity; see above)."""
    return w


def _sharded_param(
    full_shape: tuple[int, int], dim: int, state: ParallelState, init_method: InitMethod, stride: int, dtype
) -> nn.Parameter:
    local_shape = list(full_shape)
    local_shape[dim] = divide(
        full_shape[dim], state.tp * stride, f"partitioned size x stride ({stride}) / --tensor-model-parallel-size"
    ) * stride
    if init_method is None:
        data = torch.zeros(local_shape, dtype=dtype, device=state.device)
    elif init_method is uninitialized:
        data = torch.empty(local_shape, dtype=dtype, device=state.device)
    else:
        full = torch.empty(full_shape, dtype=torch.float32, device=state.device)
        init_method(full)
        data = shard_tensor(full, dim, state.tp, state.tp_rank, stride).to(dtype=dtype)
    param = nn.Parameter(data)
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = stride
    return param


def _bias(size: int, state: ParallelState, dtype) -> nn.Parameter:
    return nn.Parameter(torch.zeros(size, dtype=dtype, device=state.device))


# Rows of ``x`` at or below which ``linear`` computes ``(W @ x^T)^T`` on the CPU (see there).
SMALL_ROWS = 4


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, with the product of 2 to :data:`SMALL_ROWS` rows on the CPU computed as
    ``(weight @ x^T)^T``. Measured on this project's CPU wheel (torch 2.13, MKL, one thread), SmolLM2's head
    (49152 x 576): ``F.linear`` 12 ms for one row, 26 ms for two, 39 ms for three; the transposed product 8 ms
    and 9 ms for two and three (the verification pass of speculative decoding, method A's back-filled positions
    and batches of a few prompts pay this at every layer and head). One row and larger batches keep
    ``F.linear``; CUDA always does. Same values up to the order of
    the float additions; differentiable either way."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if x.device.type != "cpu" or not 2 <= rows <= SMALL_ROWS:
        return F.linear(x, weight, bias)
    out = (weight @ x.reshape(rows, x.shape[-1]).t()).t().reshape(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


class ColumnParallelLinear(nn.Module):
    """``Y = X A^T + b`` with A split along its output dim: weight ``[output_size/tp, input_size]``.

    ``forward(x, weight=None) -> (output, output_bias)``; ``output_bias`` is the bias when
    ``skip_bias_add`` (for the caller to fuse) else ``None``. Without ``gather_output`` the output stays
    partitioned on its last dim. With ``sequence_parallel`` the input is ``[s/tp, b, h]`` and is
    all-gathered along the sequence before the matmul."""

    def __init__(self, input_size: int, output_size: int, *, state: ParallelState, bias: bool = True,
                 gather_output: bool = False, skip_bias_add: bool = False, init_method: InitMethod = None,
                 stride: int = 1, sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32):
        super().__init__()
        if sequence_parallel and gather_output:
            raise ValueError("ColumnParallelLinear: gather_output=True is incompatible with --sequence-parallel "
                             "(the output would mix sequence and hidden partitions); keep the output parallel")
        self.input_size, self.output_size = input_size, output_size
        self.group = state.tp_group
        self.gather_output, self.skip_bias_add = gather_output, skip_bias_add
        self.tp, self.stride = state.tp, stride
        self.sequence_parallel = sequence_parallel and state.tp > 1
        self.output_size_per_partition = divide(output_size, state.tp, "output_size / --tensor-model-parallel-size")
        self.weight = _sharded_param((output_size, input_size), 0, state, init_method, stride, params_dtype)
        if bias:
            self.bias = _bias(self.output_size_per_partition, state, params_dtype)
            self.bias.tensor_model_parallel, self.bias.partition_dim, self.bias.partition_stride = True, 0, stride
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None):
        if weight is None:
            weight = self.weight
        elif weight.shape != self.weight.shape:
            raise ValueError(f"ColumnParallelLinear: weight override has shape {tuple(weight.shape)}, expected "
                             f"{tuple(self.weight.shape)} ([output_size/tp, input_size])")
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.group, tensor_parallel_output_grad=True)
        else:
            x = copy_to_tensor_model_parallel_region(x, self.group)
        out = linear(x, weight, None if self.skip_bias_add else self.bias)
        if self.gather_output:
            out = gather_from_tensor_model_parallel_region(out, self.group)
            if self.stride > 1:
                # The gather concatenates whole shards; restore the full layout of the strided blocks.
                out = unshard_tensors(out.chunk(self.tp, dim=-1), -1, self.stride)
        return out, (self.bias if self.skip_bias_add else None)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, out_per_rank={self.output_size_per_partition}"


class RowParallelLinear(nn.Module):
    """``Y = X A^T + b`` with A split along its input dim: weight ``[output_size, input_size/tp]``, full
    bias added after the reduction. ``forward(x) -> (output, output_bias)``. With ``sequence_parallel`` the
    partial outputs are reduce-scattered along the sequence (dim 0) instead of all-reduced."""

    def __init__(self, input_size: int, output_size: int, *, state: ParallelState, bias: bool = True,
                 input_is_parallel: bool = True, skip_bias_add: bool = False, init_method: InitMethod = None,
                 stride: int = 1, sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32):
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: --sequence-parallel needs input_is_parallel=True")
        if stride > 1 and not input_is_parallel:
            raise ValueError("RowParallelLinear: stride > 1 needs input_is_parallel=True (a plain scatter of the "
                             "input would not match the strided weight shards)")
        self.input_size, self.output_size = input_size, output_size
        self.group = state.tp_group
        self.input_is_parallel, self.skip_bias_add = input_is_parallel, skip_bias_add
        self.sequence_parallel = sequence_parallel and state.tp > 1
        self.input_size_per_partition = divide(input_size, state.tp, "input_size / --tensor-model-parallel-size")
        self.weight = _sharded_param((output_size, input_size), 1, state, init_method, stride, params_dtype)
        if bias:
            self.bias = _bias(output_size, state, params_dtype)
            # Each rank adds the bias to its own sequence slice only: its grad is partial under SP.
            self.bias.sequence_parallel = self.sequence_parallel
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor):
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x, self.group)
        out = linear(x, self.weight)
        if self.sequence_parallel:
            out = reduce_scatter_to_sequence_parallel_region(out, self.group)
        else:
            out = reduce_from_tensor_model_parallel_region(out, self.group)
        if self.skip_bias_add:
            return out, self.bias
        return (out if self.bias is None else out + self.bias), None

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, in_per_rank={self.input_size_per_partition}"


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocab split over tp: weight ``[num_embeddings/tp, embedding_dim]``. Ids outside
    this rank's shard look up zeros; the all-reduce over tp completes every row."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, state: ParallelState,
                 init_method: InitMethod = None, params_dtype: torch.dtype = torch.float32):
        super().__init__()
        if num_embeddings % state.tp != 0:
            raise ValueError(
                f"VocabParallelEmbedding: num_embeddings {num_embeddings} is not divisible by "
                f"--tensor-model-parallel-size {state.tp}; pad it first with pad_vocab_size "
                "(--make-vocab-size-divisible-by)"
            )
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.group = state.tp_group
        self.vocab_start, self.vocab_end = vocab_range(num_embeddings, state.tp, state.tp_rank)
        self.weight = _sharded_param((num_embeddings, embedding_dim), 0, state, init_method, 1, params_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_index_range(ids, self.num_embeddings, "token ids",
                          "the tokenizer and the model's (padded) vocab size disagree")
        if self.group is None or dist.get_world_size(self.group) == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_model_parallel_region(out, self.group)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, shard=[{self.vocab_start}, {self.vocab_end})"


def allreduce_sequence_parallel_grads(module: nn.Module, state: ParallelState) -> None:
    """Sum over tp the gradients of parameters marked ``sequence_parallel`` (replicated parameters applied
    to a sequence shard: norms inside SP regions, RowParallelLinear biases). Call after backward, before
    the data-parallel reduction."""
    if state.tp_group is None or state.tp == 1:
        return
    for p in module.parameters():
        if getattr(p, "sequence_parallel", False) and p.grad is not None:
            dist.all_reduce(p.grad, group=state.tp_group)


def gather_full_tensor(param: nn.Parameter, value: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """The unsharded form of ``value`` (``param`` itself, its grad or its ``main_grad``): shards of a
    tensor-parallel parameter are gathered over tp and reassembled with its partition dim and stride;
    a replicated parameter's value is returned as is (a detached copy). Collective over tp."""
    if not getattr(param, "tensor_model_parallel", False) or state.tp == 1:
        return value.detach().clone()
    parts = [torch.empty_like(value) for _ in range(state.tp)]
    dist.all_gather(parts, value.detach().contiguous(), group=state.tp_group)
    return unshard_tensors(parts, param.partition_dim, param.partition_stride)
