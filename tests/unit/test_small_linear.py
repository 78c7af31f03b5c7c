"""``megatron.core.tensor_parallel.linear``: a few rows on the CPU take the transposed product (``F.linear``
is 2-3x slower there for 2-3 rows); every row count gives ``F.linear``'s values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from megatron.core.tensor_parallel import layers, linear


@pytest.mark.parametrize("shape", [(5,), (1, 5), (2, 5), (3, 1, 5), (2, 2, 5), (1, 4, 5), (6, 5), (2, 3, 5)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_values_and_gradients_equal_f_linear(shape, with_bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = torch.randn(7, 5, generator=g, requires_grad=True)
    b = torch.randn(7, generator=g, requires_grad=True) if with_bias else None
    out = linear(x, w, b)
    ref = F.linear(x, w, b)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.square().sum(), [x, w] + ([b] if with_bias else []))
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, w] + ([b] if with_bias else []))
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r)


def test_only_a_few_rows_take_the_transposed_product(monkeypatch):
    calls = []
    real = F.linear
    monkeypatch.setattr(layers.F, "linear", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    w = torch.randn(3, 4)
    for rows in (1, 2, layers.SMALL_ROWS, layers.SMALL_ROWS + 1, 16):
        linear(torch.randn(rows, 4), w)
    assert calls == [(1, 4), (layers.SMALL_ROWS + 1, 4), (16, 4)]
