"""Causal self-attention with grouped query attention, RoPE and a KV cache, tensor-parallel.

``query_key_value`` is Megatron's grouped layout: per KV group ``[q heads of the group, k, v]``, groups
concatenated, so a column-parallel shard is a contiguous block of whole groups. ``dense`` is
row-parallel. Core attention can be recomputed in backward (``--recompute-granularity selective``).

Masks: ``attention_mask`` follows Megatron (bool, ``True`` = masked out, broadcastable to
``[b, 1, s_q, s_k]``); without one the attention is causal, aligned to the end of the key sequence so
``n`` new tokens after a cached prefix see the prefix and each other causally.

Kernels (:func:`core_attention`). Without an explicit mask, causality is a flag that the flash and
memory-efficient kernels of ``torch.nn.functional.scaled_dot_product_attention`` take: ``is_causal`` when
query and key lengths agree (training, prefill), the end-aligned ``causal_lower_right`` bias for several
new tokens after a cached prefix, none for one new token (it sees every key); grouped K/V heads go in
as they are (``enable_gqa``: no copy per query head; on the CPU that is also 3-5x faster for a decoded
token). An explicit mask (documents separated by ``--reset-attention-mask``) needs a kernel that takes
masks, the memory-efficient one, which does not take grouped heads: there K/V are repeated per query
head. ``--use-flash-attn`` sends half-precision CUDA tensors without an explicit mask to the flash-attn
package when it is installed (2.1 or later, which aligns causality to the end of the keys too); it is
never required, SDPA has flash kernels of its own.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, checkpoint

from .initialization import InitScope
from .rotary import apply_rotary

__all__ = ["SelfAttention", "core_attention"]


@functools.cache
def _flash_attn_func():
    """flash-attn's ``flash_attn_func`` when a version aligning causality to the end of the keys is
    installed and importable, else None."""
    try:
        import flash_attn
        from flash_attn import flash_attn_func
    except Exception:  # not installed, or built against another CUDA / torch: SDPA serves instead
        return None
    major, minor = (int(x) for x in flash_attn.__version__.split(".")[:2])
    return flash_attn_func if (major, minor) >= (2, 1) else None


def _flash_attn(q, k, v, dropout_p: float) -> torch.Tensor | None:
    """flash-attn on ``[s, b, heads, d]`` tensors, or None where it does not apply."""
    fn = _flash_attn_func() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    if fn is None:
        return None
    out = fn(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), dropout_p, causal=True)
    return out.transpose(0, 1)


def core_attention(q, k, v, attention_mask=None, dropout_p: float = 0.0, use_flash_attn: bool = False) -> torch.Tensor:
    """``q`` ``[s_q, b, heads, d]``, ``k``/``v`` ``[s_k, b, groups, d]`` -> ``[s_q, b, heads * d]``."""
    s_q, b, heads, d = q.shape
    s_k, groups = k.shape[0], k.shape[2]
    if use_flash_attn and attention_mask is None:
        out = _flash_attn(q, k, v, dropout_p)
        if out is not None:
            return out.reshape(s_q, b, heads * d)
    q = q.permute(1, 2, 0, 3)
    k = k.permute(1, 2, 0, 3)
    v = v.permute(1, 2, 0, 3)
    if attention_mask is not None:
        if groups != heads:
            # Query heads of group g are contiguous (g * heads/groups ...), hence repeat_interleave.
            k = k.repeat_interleave(heads // groups, dim=1)
            v = v.repeat_interleave(heads // groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, dropout_p=dropout_p)
    else:
        # enable_gqa maps query head h to K/V head h // (heads / groups): the same grouping.
        gqa = dict(enable_gqa=groups != heads)
        if s_q == s_k:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, **gqa)
        elif s_q == 1:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, **gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(s_q, s_k),
                                                 dropout_p=dropout_p, **gqa)
    return out.permute(2, 0, 1, 3).reshape(s_q, b, heads * d)


class SelfAttention(nn.Module):
    def __init__(self, config, *, state, layer_number: int, init: InitScope, rng_tracker=None):
        super().__init__()
        self.layer_number = layer_number
        self.rng_tracker = rng_tracker
        self.dropout_p = config.attention_dropout
        self.use_flash_attn = config.use_flash_attn
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
            return core_attention(q, k, v, attention_mask, p, self.use_flash_attn)

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
