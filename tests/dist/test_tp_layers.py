"""Tensor-parallel layers, vocab-parallel cross entropy and RNG streams in real gloo worlds (tp = 2, 4).

Every rank builds the same full weights and inputs, runs its sharded layer, and checks its slice of the
output and of every gradient against nn.Linear / nn.Embedding / F.cross_entropy holding the full weights.
All checks of one tp size share one world to keep start-up costs down."""

import pytest
import torch
import torch.nn.functional as F

from megatron.core import tensor_parallel as tpl
from megatron.core.parallel_state import ParallelDims, ParallelState
from megatron.testing.distributed import run_distributed

S, B, H, OUT = 8, 2, 12, 16


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _serial_linear(w, b, x, grad_out):
    """Output and gradients of the plain full-weight nn.Linear."""
    ref = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        ref.weight.copy_(w)
        ref.bias.copy_(b)
    x = x.clone().requires_grad_(True)
    y = ref(x)
    y.backward(grad_out)
    return y.detach(), x.grad, ref.weight.grad, ref.bias.grad


def _leaf(x):
    return x.clone().requires_grad_(True)


def _check_column(state, sp, gather, stride):
    tp, r = state.tp, state.tp_rank
    w, b = torch.randn(OUT, H, generator=_gen(1)), torch.randn(OUT, generator=_gen(2))
    x, grad_out = torch.randn(S, B, H, generator=_gen(3)), torch.randn(S, B, OUT, generator=_gen(4))
    y, gx, gw, gb = _serial_linear(w, b, x, grad_out)
    layer = tpl.ColumnParallelLinear(H, OUT, state=state, gather_output=gather, init_method=lambda t: t.copy_(w),
                                     stride=stride, sequence_parallel=sp)
    with torch.no_grad():
        layer.bias.copy_(tpl.shard_tensor(b, 0, tp, r, stride))
    x_in = _leaf(x.chunk(tp, 0)[r] if sp else x)
    out, out_bias = layer(x_in)
    assert out_bias is None
    want, g = (y, grad_out) if gather else (tpl.shard_tensor(y, -1, tp, r, stride),
                                            tpl.shard_tensor(grad_out, -1, tp, r, stride))
    torch.testing.assert_close(out, want)
    out.backward(g)
    torch.testing.assert_close(x_in.grad, gx.chunk(tp, 0)[r] if sp else gx)
    torch.testing.assert_close(layer.weight.grad, tpl.shard_tensor(gw, 0, tp, r, stride))
    torch.testing.assert_close(layer.bias.grad, tpl.shard_tensor(gb, 0, tp, r, stride))


def _check_row(state, sp, input_is_parallel):
    tp, r = state.tp, state.tp_rank
    w, b = torch.randn(OUT, H, generator=_gen(5)), torch.randn(OUT, generator=_gen(6))
    x, grad_out = torch.randn(S, B, H, generator=_gen(7)), torch.randn(S, B, OUT, generator=_gen(8))
    y, gx, gw, gb = _serial_linear(w, b, x, grad_out)
    layer = tpl.RowParallelLinear(H, OUT, state=state, input_is_parallel=input_is_parallel,
                                  init_method=lambda t: t.copy_(w), sequence_parallel=sp)
    with torch.no_grad():
        layer.bias.copy_(b)
    x_in = _leaf(x.chunk(tp, -1)[r] if input_is_parallel else x)
    out, _ = layer(x_in)
    torch.testing.assert_close(out, y.chunk(tp, 0)[r] if sp else y)
    out.backward(grad_out.chunk(tp, 0)[r] if sp else grad_out)
    tpl.allreduce_sequence_parallel_grads(layer, state)
    torch.testing.assert_close(x_in.grad, gx.chunk(tp, -1)[r] if input_is_parallel else gx)
    torch.testing.assert_close(layer.weight.grad, gw.chunk(tp, 1)[r])
    torch.testing.assert_close(layer.bias.grad, gb)


def _check_embedding(state):
    vocab = 4 * state.tp
    table = torch.randn(vocab, H, generator=_gen(9))
    ids = torch.randint(0, vocab, (B, S), generator=_gen(10))
    ids[0, :vocab] = torch.arange(vocab)[:S]  # every shard is hit
    ref = torch.nn.Embedding(vocab, H, _weight=table.clone())
    grad_out = torch.randn(B, S, H, generator=_gen(11))
    want = ref(ids)
    want.backward(grad_out)
    layer = tpl.VocabParallelEmbedding(vocab, H, state=state, init_method=lambda t: t.copy_(table))
    out = layer(ids)
    torch.testing.assert_close(out, want.detach())
    out.backward(grad_out)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad.chunk(state.tp, 0)[state.tp_rank])


def _check_cross_entropy(state, vocab, padded, ls):
    """vocab < padded: columns >= vocab are padding, excluded through vocab_size=."""
    tp, r = state.tp, state.tp_rank
    logits = torch.randn(S, B, padded, generator=_gen(12)) * 3
    target = torch.randint(0, vocab, (S, B), generator=_gen(13))
    weights = torch.rand(S, B, generator=_gen(14))
    full = _leaf(logits)
    smoothing = ls * vocab / (vocab - 1)
    ref = F.cross_entropy(full[..., :vocab].reshape(-1, vocab), target.reshape(-1), reduction="none",
                          label_smoothing=smoothing).view(S, B)
    (ref * weights).sum().backward()
    local = _leaf(logits.chunk(tp, -1)[r])
    loss = tpl.vocab_parallel_cross_entropy(local, target, state.tp_group, label_smoothing=ls,
                                            vocab_size=None if vocab == padded else vocab)
    torch.testing.assert_close(loss, ref.detach())
    (loss * weights).sum().backward()
    torch.testing.assert_close(local.grad, full.grad.chunk(tp, -1)[r])


def _megatron_golden(state):
    """Megatron-Core's TP=4 test: each shard holds 0..7 four times, targets 0, 2, ..., 30."""
    logits = torch.arange(0.0, 8.0).repeat(16, 4)
    loss = tpl.vocab_parallel_cross_entropy(logits, torch.arange(0, 32, 2), state.tp_group)
    torch.testing.assert_close(loss, torch.tensor([10.2309, 8.2309, 6.2309, 4.2309]).repeat(4), atol=1e-4, rtol=0)


def _dropout_masks(state):
    tracker = tpl.model_parallel_seed(1234, state)
    default = F.dropout(torch.ones(256), 0.5)
    with tracker.fork():
        parallel = F.dropout(torch.ones(256), 0.5)
    return default, parallel


def _check_all(rank, world):
    state = ParallelState.build(ParallelDims(tp=world))
    for sp in (False, True):
        for gather in ((False,) if sp else (False, True)):
            for stride in (1, 2):
                _check_column(state, sp, gather, stride)
        for input_is_parallel in ((True,) if sp else (True, False)):
            _check_row(state, sp, input_is_parallel)
    _check_embedding(state)
    for vocab, padded in ((8 * world, 8 * world), (8 * world - 3, 8 * world)):
        for ls in (0.0, 0.1):
            _check_cross_entropy(state, vocab, padded, ls)
    if world == 4:
        _megatron_golden(state)
    return _dropout_masks(state)


@pytest.mark.parametrize("tp", [2, 4])
def test_layers_cross_entropy_and_rng_match_serial(tp):
    masks = run_distributed(_check_all, tp)
    defaults, parallels = zip(*masks)
    assert all(torch.equal(defaults[0], m) for m in defaults), "default-stream dropout must agree across tp"
    for i in range(tp):
        for j in range(i + 1, tp):
            assert not torch.equal(parallels[i], parallels[j]), "model-parallel stream must differ across tp"
