"""Cross entropy over logits whose vocab dim is split across tensor-parallel ranks.

The full logits are never gathered: each rank contributes its max, its sum of exponentials and (if it owns
the target) the target logit through three small all-reduces. Computed in fp32; the backward is the exact
analytic gradient ``softmax - (1 - s) onehot - s / V`` (``s`` the scaled label smoothing).

Label smoothing follows Megatron: ``s = label_smoothing * V / (V - 1)`` and
``loss = (1 - s) * nll - s * mean_v log p_v`` (equals ``F.cross_entropy(..., label_smoothing=s)``).

Padded vocab entries: by default every column takes part in the softmax, as in Megatron (the model learns
to keep the padded rows' logits low). Passing ``vocab_size`` (the unpadded size) excludes the columns
``>= vocab_size`` from the softmax and from the smoothing mean, so the loss equals the unpadded loss.

With a single shard and no excluded columns the function defers to ``F.cross_entropy`` (fused kernels).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .mappings import group_rank, group_size
from .range_checks import check_index_range
from .utils import vocab_range

__all__ = ["vocab_parallel_cross_entropy"]


def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, label_smoothing, vocab_size):
        n, rank = group_size(group), group_rank(group)
        local_v = logits.shape[-1]
        padded_v = local_v * n
        real_v = padded_v if vocab_size is None else vocab_size
        start, end = vocab_range(padded_v, n, rank)
        x = logits.float()
        valid = None
        if real_v < end:
            valid = torch.arange(start, end, device=x.device) < real_v
            x = x.masked_fill(~valid, float("-inf"))
        logits_max = _all_reduce(x.max(dim=-1).values, group, dist.ReduceOp.MAX)
        x = x - logits_max.unsqueeze(-1)

        outside = (target < start) | (target >= end)
        local_target = (target - start).masked_fill(outside, 0)
        predicted = x.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        predicted = _all_reduce(predicted, group)

        exp = x.exp()
        sum_exp = _all_reduce(exp.sum(dim=-1), group)
        log_z = sum_exp.log()
        loss = log_z - predicted

        smoothing = 0.0
        if label_smoothing > 0:
            smoothing = label_smoothing * real_v / (real_v - 1)
            x_sum = x.sum(dim=-1) if valid is None else x.masked_fill(~valid, 0.0).sum(dim=-1)
            mean_log_p = _all_reduce(x_sum, group) / real_v - log_z
            loss = (1.0 - smoothing) * loss - smoothing * mean_log_p

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside, valid if valid is not None else torch.empty(0))
        ctx.smoothing, ctx.real_v, ctx.has_valid, ctx.in_dtype = smoothing, real_v, valid is not None, logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, outside, valid = ctx.saved_tensors
        grad = softmax.clone()
        onehot_weight = (1.0 - ctx.smoothing) * (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -onehot_weight.unsqueeze(-1))
        if ctx.smoothing > 0:
            uniform = ctx.smoothing / ctx.real_v
            grad -= uniform if not ctx.has_valid else uniform * valid.to(grad.dtype)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None, None


def vocab_parallel_cross_entropy(vocab_parallel_logits: torch.Tensor, target: torch.Tensor, tp_group=None,
                                 label_smoothing: float = 0.0, *, vocab_size: int | None = None) -> torch.Tensor:
    """Per-token loss (fp32, shape of ``target``) from logits ``[..., V/tp]`` sharded over ``tp_group``.

    ``vocab_size``: the unpadded vocab; columns at or beyond it are excluded (None: all columns count)."""
    if vocab_parallel_logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(vocab_parallel_logits.shape)} and target {tuple(target.shape)} disagree: "
                         "logits must be target's shape plus a trailing (vocab / tp) dim")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"--label-smoothing must lie in [0, 1), got {label_smoothing}")
    padded_v = vocab_parallel_logits.shape[-1] * group_size(tp_group)
    real_v = padded_v if vocab_size is None else vocab_size
    if not 1 < real_v <= padded_v:
        raise ValueError(f"vocab_size {vocab_size} must lie in (1, {padded_v}] (the padded vocab of the logits)")
    check_index_range(target, real_v, "targets", "the data's tokenizer and the model's vocab size disagree")
    if group_size(tp_group) == 1 and real_v == padded_v:
        # One shard holding every column: torch's fused log-softmax kernel gives the same loss, faster.
        smoothing = label_smoothing * real_v / (real_v - 1)
        loss = F.cross_entropy(vocab_parallel_logits.float().reshape(-1, padded_v), target.reshape(-1),
                               reduction="none", label_smoothing=smoothing)
        return loss.view(target.shape)
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, tp_group, label_smoothing, vocab_size)
