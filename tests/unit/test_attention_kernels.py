"""The fused paths against the plain ones, in fp32 on the CPU (tests/gpu repeats them in bf16 on CUDA):
core attention's flag-driven causality (``is_causal``, the end-aligned bias of cached decoding) and
grouped K/V heads (``enable_gqa``) against an explicit mask over repeated heads, values and gradients;
``RMSNorm`` (``torch.nn.functional.rms_norm``) against its formula."""

import pytest
import torch

from megatron.core.transformer import RMSNorm, core_attention
from megatron.core.transformer.norms import rms_norm
from megatron.testing.attention import plain_attention


def _qkv(s_q, s_k, heads, groups, b=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(s_q, b, heads, d, generator=g, requires_grad=True)
    k = torch.randn(s_k, b, groups, d, generator=g, requires_grad=True)
    v = torch.randn(s_k, b, groups, d, generator=g, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("heads, groups", [(4, 4), (6, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("s_q, s_k", [(7, 7), (1, 9), (3, 10), (1, 1)],
                         ids=["prefill", "one-token-decode", "tokens-at-offset", "first-token"])
def test_flag_causality_and_grouped_heads_equal_the_explicit_mask(heads, groups, s_q, s_k):
    q, k, v = _qkv(s_q, s_k, heads, groups)
    fused, plain = core_attention(q, k, v), plain_attention(q, k, v)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    w = torch.randn_like(plain)
    grads = torch.autograd.grad((fused * w).sum(), (q, k, v))
    want = torch.autograd.grad((plain * w).sum(), (q, k, v))
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads, groups", [(4, 4), (6, 2)], ids=["mha", "gqa"])
def test_explicit_mask_path_equals_the_reference(heads, groups):
    """Megatron's mask (True = masked out), here two documents in one sequence (--reset-attention-mask)."""
    q, k, v = _qkv(6, 6, heads, groups)
    keep = torch.ones(6, 6, dtype=torch.bool).tril()
    keep[3:, :3] = False
    got = core_attention(q, k, v, attention_mask=~keep[None, None])
    torch.testing.assert_close(got, plain_attention(q, k, v, keep), rtol=1e-5, atol=1e-6)


def test_use_flash_attn_without_the_package_or_cuda_takes_sdpa():
    """--use-flash-attn never fails: without flash-attn (or off CUDA, or in fp32) SDPA serves."""
    q, k, v = _qkv(5, 5, 6, 2)
    torch.testing.assert_close(core_attention(q, k, v, use_flash_attn=True), core_attention(q, k, v), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_equals_the_formula(dtype):
    """torch's rms_norm (what RMSNorm uses on accelerators) against the formula (its CPU path), values
    and gradients; bf16 within its rounding (the fused path rounds once, the formula twice)."""
    g = torch.Generator().manual_seed(0)
    w = (torch.rand(16, generator=g) + 0.5).to(dtype).requires_grad_(True)
    x = (torch.randn(3, 2, 16, generator=g) * 3).to(dtype).requires_grad_(True)
    fused, plain = rms_norm(x, w, 1e-5, fused=True), rms_norm(x, w, 1e-5, fused=False)
    assert fused.dtype == plain.dtype == dtype
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=2e-2)
    torch.testing.assert_close(fused.float(), plain.float(), **tol)
    gy = torch.randn(3, 2, 16, generator=g).to(dtype)
    for a, b in zip(torch.autograd.grad((fused * gy).sum(), (x, w)), torch.autograd.grad((plain * gy).sum(), (x, w))):
        torch.testing.assert_close(a.float(), b.float(), **(tol if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)))
    norm = RMSNorm(16, dtype=dtype)
    torch.testing.assert_close(norm(x), rms_norm(x, norm.weight, norm.eps, fused=False), rtol=0, atol=0)
