"""Normalisation layers chosen by ``--normalization``: LayerNorm (weight + bias) or RMSNorm (weight).

Parameters are replicated over tensor-parallel ranks. Under sequence parallelism a norm sees only its
rank's sequence slice, so its gradient is partial: such parameters carry ``sequence_parallel = True``
and are summed over tp by ``allreduce_sequence_parallel_grads``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RMSNorm", "rms_norm", "build_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fused: bool | None = None) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight``, accumulated in fp32. ``fused`` (default: on accelerators,
    when ``x`` and ``weight`` share a dtype) takes ``torch.nn.functional.rms_norm``: one kernel on CUDA
    instead of five passes over the activations. On the CPU the formula is kept: torch's CPU
    ``rms_norm`` measured slower than it for training shapes (it gains only on one decoded token)."""
    if fused is None:
        fused = x.device.type != "cpu" and x.dtype == weight.dtype
    if fused:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


class RMSNorm(nn.Module):
    """:func:`rms_norm` with a learned weight (fp32 statistics, as Hugging Face Llama)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, device=None, dtype=torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

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
