"""One GPU: the fused paths equal the plain ones in bf16 -- SDPA's flash / efficient kernels driven by flags
(``is_causal``, the end-aligned bias of cached decoding, ``enable_gqa``) against an fp32 explicit-mask
reference, SDPA's flash kernel really taken where no mask is needed, the flash-attn package when installed,
and torch's fused RMSNorm against the formula."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron.core.transformer import core_attention
from megatron.testing.attention import plain_attention  # the fp32 reference of tests/unit/test_attention_kernels.py
from megatron.core.transformer.attention import _flash_attn_func
from megatron.core.transformer.norms import rms_norm

SHAPES = [(64, 64, 8, 8), (64, 64, 12, 4), (1, 80, 12, 4), (5, 80, 12, 4)]
IDS = ["prefill-mha", "prefill-gqa", "decode-one", "decode-several-at-offset"]


def _qkv(s_q, s_k, heads, groups, device, dtype, b=2, d=64):
    g = torch.Generator().manual_seed(0)
    shapes = ((s_q, b, heads, d), (s_k, b, groups, d), (s_k, b, groups, d))
    return [torch.randn(*s, generator=g).to(device=device, dtype=dtype) for s in shapes]


@pytest.mark.parametrize("s_q, s_k, heads, groups", SHAPES, ids=IDS)
def test_sdpa_paths_in_bf16_equal_the_fp32_reference(device, half, s_q, s_k, heads, groups):
    q, k, v = _qkv(s_q, s_k, heads, groups, device, half)
    got = core_attention(q, k, v).float()
    want = plain_attention(*(t.float() for t in (q, k, v)))
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("s_q, s_k, heads, groups", SHAPES[:3], ids=IDS[:3])
def test_sdpa_takes_the_flash_kernel_without_a_mask(device, half, s_q, s_k, heads, groups):
    """Restricted to the flash backend, SDPA raises if the call cannot use it: it can, for causal
    training / prefill and a decoded token, grouped heads included."""
    if device.type != "cuda":
        pytest.skip("the flash backend exists on CUDA only")
    q, k, v = _qkv(s_q, s_k, heads, groups, device, half)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = core_attention(q, k, v)
    torch.testing.assert_close(out, core_attention(q, k, v), rtol=0, atol=0)


@pytest.mark.parametrize("s_q, s_k, heads, groups", SHAPES, ids=IDS)
def test_flash_attn_package_equals_sdpa(device, half, s_q, s_k, heads, groups):
    if device.type != "cuda" or _flash_attn_func() is None:
        pytest.skip("flash-attn >= 2.1 is not installed (optional: --use-flash-attn falls back to SDPA)")
    q, k, v = _qkv(s_q, s_k, heads, groups, device, half)
    torch.testing.assert_close(core_attention(q, k, v, use_flash_attn=True).float(), core_attention(q, k, v).float(),
                               rtol=2e-2, atol=2e-2)


def test_fused_rms_norm_equals_the_formula_in_bf16(device, half):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 4, 256, generator=g) * 3).to(device=device, dtype=half)
    w = (torch.rand(256, generator=g) + 0.5).to(device=device, dtype=half)
    fused = rms_norm(x, w, 1e-5)  # the default path on the GPU
    plain = rms_norm(x, w, 1e-5, fused=False)
    assert fused.dtype == half
    torch.testing.assert_close(fused.float(), plain.float(), rtol=1.6e-2, atol=2e-2)
