"""Soft targets over logits whose vocab dim is split across tensor-parallel ranks (self-distillation).

* :func:`vocab_parallel_top_k`: the ``k`` largest logits and their GLOBAL vocab ids, without gathering the
  logits: each rank takes its local top ``k``, the ``k x tp`` candidates are all-gathered (small), and the
  top ``k`` of those is the answer. Columns ``>= vocab_size`` (the padding) are never chosen. No autograd.
* :func:`vocab_parallel_soft_cross_entropy`: ``-sum_j q_j log softmax(z / T)[ids_j]`` per token, the
  cross-entropy of the (sharded) student logits ``z`` against a distribution ``q`` given on ``k`` ids.
  Like :mod:`.cross_entropy` it reduces a max, a sum of exponentials and the picked logits over tp; the
  backward is the analytic ``(sum(q) softmax - q_onehot) / T``. The softmax runs over every column,
  padding included (as the token cross-entropy and inference do), so the student is judged as decoding
  sees it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .mappings import gather_from_tensor_model_parallel_region, group_rank, group_size
from .utils import vocab_range

__all__ = ["vocab_parallel_top_k", "vocab_parallel_soft_cross_entropy"]


def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


@torch.no_grad()
def vocab_parallel_top_k(logits: torch.Tensor, k: int, group=None, vocab_size: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values fp32 [..., k], global ids int64 [..., k])``, values descending, from logits ``[..., V/tp]``.

    ``vocab_size``: the unpadded vocabulary; columns at or beyond it are excluded (None: all count)."""
    n, rank = group_size(group), group_rank(group)
    local_v = logits.shape[-1]
    real_v = local_v * n if vocab_size is None else vocab_size
    if not 1 <= k <= real_v:
        raise ValueError(f"top-k needs 1 <= k <= the vocabulary ({real_v}), got k = {k}")
    start, end = vocab_range(local_v * n, n, rank)
    x = logits.float()
    if real_v < end:
        x = x.masked_fill(torch.arange(start, end, device=x.device) >= real_v, float("-inf"))
    values, ids = x.topk(min(k, local_v), dim=-1)
    ids = ids + start
    if n > 1:
        values = gather_from_tensor_model_parallel_region(values.contiguous(), group)
        ids = gather_from_tensor_model_parallel_region(ids.contiguous(), group)
        values, where = values.topk(k, dim=-1)
        ids = ids.gather(-1, where)
    return values, ids


class _SoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ids, probs, group, temperature):
        n, rank = group_size(group), group_rank(group)
        local_v = logits.shape[-1]
        start, end = vocab_range(local_v * n, n, rank)
        x = logits.float() / temperature
        x = x - _all_reduce(x.max(dim=-1).values, group, dist.ReduceOp.MAX).unsqueeze(-1)
        inside = (ids >= start) & (ids < end)
        local_ids = (ids - start).masked_fill(~inside, 0)
        picked = _all_reduce(x.gather(-1, local_ids).masked_fill(~inside, 0.0), group)
        exp = x.exp()
        sum_exp = _all_reduce(exp.sum(dim=-1), group)
        q = probs.float()
        loss = (q * (sum_exp.log().unsqueeze(-1) - picked)).sum(dim=-1)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_ids, q * inside, q.sum(dim=-1, keepdim=True))
        ctx.temperature, ctx.in_dtype = temperature, logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_ids, q_local, q_sum = ctx.saved_tensors  # q_local: q on the ids this rank holds
        grad = softmax * q_sum
        grad.scatter_add_(-1, local_ids, -q_local)
        grad.mul_((grad_loss / ctx.temperature).unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None, None


def vocab_parallel_soft_cross_entropy(logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, group=None,
                                      temperature: float = 1.0) -> torch.Tensor:
    """Per-token ``-sum_j probs_j log softmax(logits / temperature)[ids_j]`` (fp32, shape ``logits[..., 0]``)
    from logits ``[..., V/tp]`` sharded over ``group`` and GLOBAL ``ids`` / ``probs`` ``[..., k]``.
    ``probs`` need not sum to one (its sum scales the softmax part of the gradient)."""
    if ids.shape != probs.shape or ids.shape[:-1] != logits.shape[:-1]:
        raise ValueError(f"logits {tuple(logits.shape)}, ids {tuple(ids.shape)} and probs {tuple(probs.shape)} "
                         "disagree: ids and probs are [..., k] with the logits' leading dims")
    if temperature <= 0:
        raise ValueError(f"the distillation temperature must be positive, got {temperature}")
    return _SoftCrossEntropy.apply(logits, ids, probs.detach(), group, float(temperature))
