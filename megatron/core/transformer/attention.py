"""Causal self-attention with grouped query attention, RoPE and a KV cache, tensor-parallel.

``query_key_value`` is Megatron's grouped layout: per KV group ``[q heads of the group, k, v]``, groups
concatenated, so a column-parallel shard is a contiguous block of whole groups. ``dense`` is
row-parallel. Core attention is ``torch.nn.functional.scaled_dot_product_attention`` (which dispatches
to flash / memory-efficient kernels on GPUs by itself); it can be recomputed in backward
(``--recompute-granularity selective``).

Masks: ``attention_mask`` follows Megatron (bool, ``True`` = masked out, broadcastable to
``[b, 1, s_q, s_k]``); without one the attention is causal, aligned to the end of the key sequence so
``n`` new tokens after a cached prefix see the prefix and each other causally.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, checkpoint

from .initialization import InitScope
from .rotary import apply_rotary

__all__ = ["SelfAttention", "core_attention"]


def core_attention(q, k, v, attention_mask=None, dropout_p: float = 0.0) -> torch.Tensor:
    """``q`` ``[s_q, b, heads, d]``, ``k``/``v`` ``[s_k, b, groups, d]`` -> ``[s_q, b, heads * d]``."""
    s_q, b, heads, d = q.shape
    s_k, groups = k.shape[0], k.shape[2]
    q = q.permute(1, 2, 0, 3)
    k = k.permute(1, 2, 0, 3)
    v = v.permute(1, 2, 0, 3)
    if groups != heads:
        # Query heads of group g are contiguous (g * heads/groups ...), hence repeat_interleave.
        k = k.repeat_interleave(heads // groups, dim=1)
        v = v.repeat_interleave(heads // groups, dim=1)
    mask, causal = None, False
    if attention_mask is not None:
        mask = ~attention_mask
    elif s_q == s_k:
        causal = True
    elif s_q > 1:
        mask = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril(diagonal=s_k - s_q)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
    return out.permute(2, 0, 1, 3).reshape(s_q, b, heads * d)


class SelfAttention(nn.Module):
    def __init__(self, config, *, state, layer_number: int, init: InitScope, rng_tracker=None):
        super().__init__()
        self.layer_number = layer_number
        self.rng_tracker = rng_tracker
        self.dropout_p = config.attention_dropout
        self.selective_recompute = config.recompute_granularity == "selective"
        d, heads, groups = config.head_dim, config.num_attention_heads, config.query_groups
        self.head_dim = d
        self.heads_per_group = heads // groups
        self.local_groups = groups // state.tp
        common = dict(state=state, bias=config.add_bias_linear, sequence_parallel=config.sequence_parallel,
                      params_dtype=config.params_dtype)
        self.query_key_value = ColumnParallelLinear(
            config.hidden_size, groups * (self.heads_per_group + 2) * d, init_method=init.normal("query_key_value.weight"),
            **common)
        self.dense = RowParallelLinear(
            heads * d, config.hidden_size, input_is_parallel=True, init_method=init.scaled("dense.weight"), **common)

    def _dropout_context(self):
        # Heads are split over tp: each rank's attention-probability dropout must differ.
        if self.training and self.dropout_p > 0 and self.rng_tracker is not None:
            return self.rng_tracker.fork()
        return contextlib.nullcontext()

    def _core(self, q, k, v, attention_mask):
        p = self.dropout_p if self.training else 0.0
        with self._dropout_context():
            return core_attention(q, k, v, attention_mask, p)

    def forward(self, x, attention_mask=None, rope=None, inference_params=None):
        """``x`` ``[s(/tp under SP), b, h]`` -> ``[s(/tp), b, h]``."""
        mixed, _ = self.query_key_value(x)
        s, b = mixed.shape[0], mixed.shape[1]
        r, d = self.heads_per_group, self.head_dim
        mixed = mixed.view(s, b, self.local_groups, (r + 2) * d)
        q, k, v = torch.split(mixed, [r * d, d, d], dim=-1)
        q = q.reshape(s, b, self.local_groups * r, d)
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        if inference_params is not None:
            k, v = inference_params.update(self.layer_number, k, v)
        if self.selective_recompute and self.training and torch.is_grad_enabled():
            ctx = checkpoint(self._core, q, k, v, attention_mask, tracker=self.rng_tracker)
        else:
            ctx = self._core(q, k, v, attention_mask)
        out, _ = self.dense(ctx)
        return out
