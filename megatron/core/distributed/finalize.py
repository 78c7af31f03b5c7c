"""After the last backward of a step: bring every gradient to its final value in ``main_grad``.

Three reductions, in this order:

1. sequence-parallel parameters (norms and row-parallel biases applied to a sequence shard) are summed
   over tp -- each rank saw only its part of the sequence;
2. copies of a tied output projection (the word embedding on the first, last and exit stages) are
   summed over the stages holding them, and over the chunks of this rank holding one (vpp), so every
   copy takes the same step;
3. the data-parallel mean (:class:`GradBuffers.finish_grad_sync`).

Steps 1 and 2 act on parameters that :func:`late_params` lists; the grad buffers keep those in buckets
reduced over dp only after steps 1-2 (a reduce-scatter leaves each rank a different shard, after which
no element-wise sum over other groups may follow). All three are linear, so the result equals the
gradient of one process running the whole model on the whole batch.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.distributed as dist

from megatron.core.parallel_state import ParallelState

from .grad_buffer import GradBuffers

__all__ = ["late_params", "TiedGroups", "reduce_tied_grads", "finalize_model_grads"]


def late_params(chunk: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters of ``chunk`` whose gradient needs a tp or pipeline sum before the dp reduction."""
    tied = {id(p) for p in _tied(chunk).values()}
    return [
        p for p in chunk.parameters()
        if p.requires_grad and (getattr(p, "sequence_parallel", False) or id(p) in tied)
    ]


class TiedGroups:
    """One process group per tied projection name, over the pipeline stages holding a copy (sorted
    ranks). Built collectively: every rank must construct it with chunks of the same model."""

    def __init__(self, chunks: Sequence[torch.nn.Module], state: ParallelState) -> None:
        stages: Mapping[str, list[int]] = chunks[0].tied_stages() if hasattr(chunks[0], "tied_stages") else {}
        self.groups: dict[str, dist.ProcessGroup | None] = {}
        for name in sorted(stages):
            group = state.new_stage_group(stages[name]) if len(stages[name]) > 1 else None
            self.groups[name] = group


def _tied(chunk: torch.nn.Module) -> Mapping[str, torch.nn.Parameter]:
    return chunk.tied_parameters() if hasattr(chunk, "tied_parameters") else {}


def reduce_tied_grads(chunks: Sequence[torch.nn.Module], tied_groups: TiedGroups | None = None,
                      attr: str = "main_grad") -> None:
    """Step 2 of the module docstring: sum each tied projection's gradient over this rank's copies, then
    over the stages holding one (``tied_groups``; None: this rank holds every copy), in place, so every copy
    ends with the total. ``attr``: the gradient each parameter carries (``main_grad`` with grad buffers,
    ``grad`` for a model trained without them)."""
    copies: dict[str, list[torch.nn.Parameter]] = {}
    for chunk in chunks:
        for name, p in _tied(chunk).items():
            if p.requires_grad:
                copies.setdefault(name, []).append(p)
    for name in sorted(copies):
        params = copies[name]
        total = getattr(params[0], attr).clone()
        for p in params[1:]:
            total += getattr(p, attr)
        group = tied_groups.groups.get(name) if tied_groups is not None else None
        if group is not None:
            dist.all_reduce(total, group=group)
        for p in params:
            getattr(p, attr).copy_(total)


def finalize_model_grads(
    chunks: Sequence[torch.nn.Module],
    buffers: Sequence[GradBuffers],
    state: ParallelState,
    tied_groups: TiedGroups | None = None,
) -> None:
    """Steps 1-3 of the module docstring on this rank's chunks (``buffers[i]`` belongs to ``chunks[i]``)."""
    if state.tp_group is not None:
        for chunk in chunks:
            for p in chunk.parameters():
                if p.requires_grad and getattr(p, "sequence_parallel", False):
                    dist.all_reduce(p.main_grad, group=state.tp_group)
    reduce_tied_grads(chunks, tied_groups)
    for b in buffers:
        b.finish_grad_sync()
