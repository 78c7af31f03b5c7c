"""The baseline: a plain PyTorch GPT (``nn.Module``, no Megatron machinery) of the same shape as our model.

Same architecture as ``EarlyExitGPTModel`` with LayerNorm, learned absolute positions, GELU MLP of 4h,
biases, untied output layer, no dropout: embedding + pre-norm blocks (fused qkv, SDPA causal attention) +
final norm + output projection. ``PlainGPT(stage=..., num_stages=...)`` builds one pipeline stage of it
(embedding on the first, norm and head on the last) for ``torch.distributed.pipelining``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPTShape", "PlainGPT", "token_batch", "plain_loss"]


@dataclass(frozen=True)
class GPTShape:
    """Model and batch sizes shared by our model and the baseline (``vocab`` is the padded vocabulary)."""

    layers: int = 4
    hidden: int = 128
    heads: int = 4
    seq: int = 128
    vocab: int = 8192
    mbs: int = 4  # micro batch size
    m: int = 4  # microbatches per step

    @property
    def tokens_per_step(self) -> int:
        return self.seq * self.mbs * self.m


def token_batch(shape: GPTShape, mb: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Microbatch ``mb``: seeded random token ids (the same for every runner), next-token labels, full mask."""
    g = torch.Generator().manual_seed(seed * 100_003 + mb)
    text = torch.randint(0, shape.vocab, (shape.mbs, shape.seq + 1), generator=g)
    return {"tokens": text[:, :-1].contiguous(), "labels": text[:, 1:].contiguous(),
            "loss_mask": torch.ones(shape.mbs, shape.seq)}


class Block(nn.Module):
    def __init__(self, h: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.fc1, self.fc2 = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, h)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class PlainGPT(nn.Module):
    """The whole model (default) or pipeline stage ``stage`` of ``num_stages`` (layers split evenly).
    Input: token ids ``[b, s]`` on the first stage, hidden ``[b, s, h]`` otherwise; output: logits
    ``[b, s, V]`` on the last stage, hidden otherwise."""

    def __init__(self, shape: GPTShape, stage: int = 0, num_stages: int = 1, seed: int = 0):
        super().__init__()
        if shape.layers % num_stages:
            raise ValueError(f"{shape.layers} layers do not split evenly over {num_stages} stages")
        torch.manual_seed(seed + stage)
        self.first, self.last = stage == 0, stage == num_stages - 1
        h = shape.hidden
        if self.first:
            self.wte, self.wpe = nn.Embedding(shape.vocab, h), nn.Embedding(shape.seq, h)
        self.blocks = nn.ModuleList(Block(h, shape.heads) for _ in range(shape.layers // num_stages))
        if self.last:
            self.ln_f, self.head = nn.LayerNorm(h), nn.Linear(h, shape.vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            x = self.wte(x) + self.wpe(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x)) if self.last else x


def plain_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy (the same masked mean as ours with a full mask)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
