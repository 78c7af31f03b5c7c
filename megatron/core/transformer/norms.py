"""Normalisation layers chosen by ``--normalization``: LayerNorm (weight + bias) or RMSNorm (weight).

Parameters are replicated over tensor-parallel ranks. Under sequence parallelism a norm sees only its
rank's sequence slice, so its gradient is partial: such parameters carry ``sequence_parallel = True``
and are summed over tp by ``allreduce_sequence_parallel_grads``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RMSNorm", "build_norm"]


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight``, computed in fp32 (as Hugging Face Llama does)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, device=None, dtype=torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def build_norm(config, device=None) -> nn.Module:
    """The norm ``config.normalization`` names, marked for sequence-parallel grad reduction if needed."""
    h, eps, dtype = config.hidden_size, config.norm_epsilon, config.params_dtype
    if config.normalization == "RMSNorm":
        norm = RMSNorm(h, eps, device=device, dtype=dtype)
    elif config.normalization == "LayerNorm":
        norm = nn.LayerNorm(h, eps=eps, device=device, dtype=dtype)
    else:
        raise ValueError(f"--normalization must be LayerNorm or RMSNorm, got {config.normalization!r}")
    if config.sequence_parallel:
        for p in norm.parameters():
            p.sequence_parallel = True
    return norm
