"""Reference implementations the fused kernels are compared with (the CPU tests in fp32, the GPU rung in
bf16): :func:`plain_attention`, attention written out with repeated K/V heads and an explicit mask."""

from __future__ import annotations

import torch

__all__ = ["plain_attention"]


def plain_attention(q, k, v, keep=None):
    """The reference: K/V repeated per query head, an explicit boolean mask (True = attend), end-aligned."""
    s_q, b, heads, d = q.shape
    s_k, groups = k.shape[0], k.shape[2]
    if keep is None:
        keep = torch.ones(s_q, s_k, dtype=torch.bool).tril(diagonal=s_k - s_q)
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    k, v = (t.repeat_interleave(heads // groups, dim=1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2)) / d ** 0.5
    out = scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v
    return out.permute(2, 0, 1, 3).reshape(s_q, b, heads * d)
