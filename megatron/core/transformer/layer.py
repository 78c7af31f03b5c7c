"""The pre-norm transformer layer: ``a = x + attn(norm(x))``, ``y = a + mlp(norm(a))``.

Submodule names are Megatron's (``input_norm``, ``self_attention``, ``post_attention_norm``, ``mlp``)
so a layer's state dict is Megatron's. The two halves are separate methods because an exit layer reuses
the attention output ``a`` and the normalised ``post_attention_norm(a)`` for its branch MLP.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .attention import SelfAttention
from .initialization import InitScope
from .mlp import MLP
from .norms import build_norm

__all__ = ["TransformerLayer"]


class TransformerLayer(nn.Module):
    def __init__(self, config, *, state, layer_number: int, init: InitScope, rng_tracker=None,
                 mlp: nn.Module | None = None):
        super().__init__()
        self.layer_number = layer_number
        self.hidden_dropout = config.hidden_dropout
        self.rng_tracker = rng_tracker if config.sequence_parallel and state.tp > 1 else None
        self.input_norm = build_norm(config, state.device)
        self.self_attention = SelfAttention(
            config, state=state, layer_number=layer_number, init=init.child("self_attention"), rng_tracker=rng_tracker)
        self.post_attention_norm = build_norm(config, state.device)
        self.mlp = mlp if mlp is not None else MLP(config, state=state, init=init.child("mlp"))

    def dropout_add(self, x: torch.Tensor, residual: torch.Tensor, training: bool | None = None) -> torch.Tensor:
        """``residual + dropout(x)``; ``training`` (default: this layer's mode) lets the owner of ``x``
        decide, e.g. an exit branch computed inside a frozen layer under EE-Tuning."""
        if not (self.training if training is None else training) or self.hidden_dropout == 0:
            return residual + x
        # Under sequence parallelism each tp rank holds a different slice: draw from the per-rank stream.
        ctx = self.rng_tracker.fork() if self.rng_tracker is not None else contextlib.nullcontext()
        with ctx:
            return residual + F.dropout(x, self.hidden_dropout, training=True)

    def attention_block(self, x, attention_mask=None, rope=None, inference_params=None) -> torch.Tensor:
        out = self.self_attention(self.input_norm(x), attention_mask, rope, inference_params)
        return self.dropout_add(out, x)

    def forward(self, x, attention_mask=None, rope=None, inference_params=None) -> torch.Tensor:
        a = self.attention_block(x, attention_mask, rope, inference_params)
        return self.dropout_add(self.mlp(self.post_attention_norm(a)), a)
