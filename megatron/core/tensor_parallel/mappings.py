"""Conjugate communication pairs of tensor parallelism, as autograd functions.

Each public function takes ``(x, group)``; ``group=None`` (or a one-member group) is the identity, so the
same model code runs with and without tp. Forward / backward pairs:

============================================  ========================  ========================
function                                       forward                   backward
============================================  ========================  ========================
copy_to_tensor_model_parallel_region          identity                  all-reduce
reduce_from_tensor_model_parallel_region      all-reduce                identity
scatter_to_tensor_model_parallel_region       split last dim            all-gather last dim
gather_from_tensor_model_parallel_region      all-gather last dim       split last dim
scatter_to_sequence_parallel_region           split first dim           all-gather first dim
gather_from_sequence_parallel_region          all-gather first dim      reduce-scatter (or split)
reduce_scatter_to_sequence_parallel_region    reduce-scatter first dim  all-gather first dim
============================================  ========================  ========================
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core.collectives import all_gather_single, reduce_scatter_single

__all__ = [
    "copy_to_tensor_model_parallel_region",
    "reduce_from_tensor_model_parallel_region",
    "scatter_to_tensor_model_parallel_region",
    "gather_from_tensor_model_parallel_region",
    "scatter_to_sequence_parallel_region",
    "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "group_size",
    "group_rank",
]


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


# ---------------------------------------------------------------- raw collectives (no autograd)
def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    # Never reduce in place: x may be saved by autograd or alias a caller's tensor.
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = group_size(group)
    size = x.shape[dim]
    if size % n != 0:
        raise ValueError(
            f"cannot split dimension {dim} of size {size} over {n} tensor-parallel ranks; "
            "make it divisible by --tensor-model-parallel-size (for sequence parallelism: the sequence length)"
        )
    return torch.split(x, size // n, dim=dim)[group_rank(group)].contiguous()


def _gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = group_size(group)
    x = x.contiguous()
    if dim == 0:
        out = x.new_empty((x.shape[0] * n, *x.shape[1:]))
        all_gather_single(out, x, group=group)
        return out
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    n = group_size(group)
    if x.shape[0] % n != 0:
        raise ValueError(
            f"cannot reduce-scatter a first dimension of {x.shape[0]} over {n} ranks; the sequence length "
            "must be divisible by --tensor-model-parallel-size with --sequence-parallel"
        )
    x = x.contiguous()
    out = x.new_empty((x.shape[0] // n, *x.shape[1:]))
    reduce_scatter_single(out, x, group=group)
    return out


# ---------------------------------------------------------------- autograd pairs
class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, x.dim() - 1, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, grad.dim() - 1, ctx.group), None


class _GatherLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, x.dim() - 1, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, grad.dim() - 1, ctx.group), None


class _ScatterFirst(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, 0, ctx.group), None


class _GatherFirst(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, tp_output_grad):
        ctx.group = group
        ctx.tp_output_grad = tp_output_grad
        return _gather(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        # When the gathered tensor feeds tp-partitioned compute, every rank holds a partial gradient of
        # the whole sequence: sum them while scattering. Otherwise each rank's gradient is already full.
        if ctx.tp_output_grad:
            return _reduce_scatter(grad, ctx.group), None, None
        return _split(grad, 0, ctx.group), None, None


class _ReduceScatterFirst(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, 0, ctx.group), None


def _trivial(group) -> bool:
    return group is None or dist.get_world_size(group) == 1


def copy_to_tensor_model_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if _trivial(group) else _Copy.apply(x, group)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if _trivial(group) else _Reduce.apply(x, group)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if _trivial(group) else _ScatterLast.apply(x, group)


def gather_from_tensor_model_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if _trivial(group) else _GatherLast.apply(x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if _trivial(group) else _ScatterFirst.apply(x, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group, tensor_parallel_output_grad: bool = True):
    return x if _trivial(group) else _GatherFirst.apply(x, group, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if _trivial(group) else _ReduceScatterFirst.apply(x, group)
