"""Model-wide gradient reductions: inf/nan check with unscaling, global norm, clipping, zero count.

Every function takes the fp32 master gradients this rank holds and ``groups``: the process groups over
which the per-rank partial results combine into the model-wide value (the model-parallel group for the
plain optimizer; model-parallel then data-parallel for the distributed optimizer, whose ranks hold
disjoint shards). ``None`` groups are skipped (size 1). Reducing over the mp group first and then the dp
group reaches every rank of the world exactly once because the two families form a grid.

Each call is a collective: every rank of the groups must call it, also ranks holding no gradient (a
pipeline stage with nothing to train contributes zeros instead of skipping, which would hang the rest).
The caller filters the gradients that enter norms (see ``param_groups.counted_once``) so replicated and
tied copies are counted once; clipping then scales every gradient, replicated ones included.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

__all__ = ["reduce_over", "unscale_and_check_finite", "global_grad_norm", "clip_by_total_norm", "count_zeros"]

Groups = Sequence["dist.ProcessGroup | None"]


def reduce_over(value: torch.Tensor, groups: Groups, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce ``value`` in place over each non-None group in turn."""
    for group in groups:
        if group is not None:
            dist.all_reduce(value, op=op, group=group)
    return value


def unscale_and_check_finite(grads: list[torch.Tensor], inv_scale: float | None, groups: Groups,
                             device: torch.device) -> bool:
    """Multiply ``grads`` by ``inv_scale`` (if given) in place and return whether any gradient on any rank
    of ``groups`` holds inf/nan."""
    found = torch.zeros(1, dtype=torch.float32, device=device)
    if grads:
        scale = torch.full((1,), 1.0 if inv_scale is None else inv_scale, dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, scale)
    return bool(reduce_over(found, groups, dist.ReduceOp.MAX).item() > 0)


def global_grad_norm(grads: list[torch.Tensor], groups: Groups, device: torch.device) -> float:
    """The L2 norm of all gradients of the model, given this rank's share (sum of squares over ``groups``)."""
    if grads:
        local = torch.stack([n.to(torch.float32) for n in torch._foreach_norm(grads, 2.0)]).square().sum()
    else:
        local = torch.zeros((), device=device)
    total = local.to(device=device, dtype=torch.float32).reshape(1)
    return float(reduce_over(total, groups).item()) ** 0.5


def clip_by_total_norm(grads: list[torch.Tensor], max_norm: float, total_norm: float) -> None:
    """Scale ``grads`` in place so that a model with norm ``total_norm`` gets norm ``max_norm`` (no-op when
    already within it)."""
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0 and grads:
        torch._foreach_mul_(grads, coeff)


def count_zeros(grads: list[torch.Tensor], groups: Groups, device: torch.device) -> int:
    """Number of exactly-zero gradient entries in the model (``--log-num-zeros-in-grad``)."""
    local = torch.zeros(1, dtype=torch.float64, device=device)
    for g in grads:
        local += g.numel() - torch.count_nonzero(g)
    return int(reduce_over(local, groups).item())
