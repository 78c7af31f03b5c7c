"""Rotary position embedding (RoPE), rotate-half convention (as Megatron and Hugging Face Llama).

The first ``rotary_dim = kv_channels * rotary_percent`` channels of each head are rotated; the rest
pass through. Angles come from explicit position ids, so cached decoding (positions starting at an
offset) and several new tokens at once use the same code as a full forward. PyTorch has no fused
rotary kernel in eager mode; the rotation is a few elementwise kernels on ``q`` and ``k`` only.
"""

from __future__ import annotations

import torch

__all__ = ["RotaryEmbedding", "apply_rotary"]


class RotaryEmbedding:
    """Stateless: ``cos_sin(position_ids)`` returns the ``(cos, sin)`` pair ``[s, b, 1, rotary_dim]``."""

    def __init__(self, rotary_dim: int, base: float = 10000.0):
        if rotary_dim % 2 != 0 or rotary_dim < 2:
            raise ValueError(f"rotary dimension must be even and >= 2, got {rotary_dim} (--rotary-percent)")
        self.rotary_dim = rotary_dim
        self.inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
        # One copy per device: copying the frequencies to the GPU on every forward would be a blocking
        # host-to-device transfer each time.
        self._inv_freq_on: dict[torch.device, torch.Tensor] = {self.inv_freq.device: self.inv_freq}

    def cos_sin(self, position_ids: torch.Tensor, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``position_ids`` is ``[b, s]``."""
        inv = self._inv_freq_on.get(position_ids.device)
        if inv is None:
            inv = self._inv_freq_on.setdefault(position_ids.device, self.inv_freq.to(position_ids.device))
        freqs = position_ids.t().unsqueeze(-1).float() * inv  # [s, b, d/2]
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(2)  # [s, b, 1, d]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(t: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate ``t`` ``[s, b, heads, d]`` by the angles of ``cos_sin`` (each ``[s, b, 1, rotary_dim]``)."""
    cos, sin = cos_sin
    rd = cos.shape[-1]
    rot, rest = t[..., :rd], t[..., rd:]
    rot = rot * cos + _rotate_half(rot) * sin
    return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot
