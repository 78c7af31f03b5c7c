"""Tensor-parallel core in one process: sharding helpers, vocab padding, tp=1 layers, cross entropy with
label smoothing and padding, the RNG tracker and RNG-exact activation checkpointing."""

import pytest
import torch
import torch.nn.functional as F

from megatron.core import tensor_parallel as tpl
from megatron.core.parallel_state import ParallelDims, ParallelState


# ---------------------------------------------------------------- sharding helpers
@pytest.mark.parametrize("tp,stride,dim", [(1, 1, 0), (2, 1, 1), (4, 1, 0), (2, 2, 0), (4, 2, 1), (2, 3, -1)])
def test_shard_unshard_round_trip(tp, stride, dim):
    full = torch.randn(24, 12 * stride)
    shards = [tpl.shard_tensor(full, dim, tp, r, stride) for r in range(tp)]
    assert all(s.shape[dim] == full.shape[dim] // tp for s in shards)
    assert torch.equal(tpl.unshard_tensors(shards, dim, stride), full)


def test_stride_two_keeps_gate_and_up_slices():
    gate_up = torch.arange(8.0)  # [gate 0..3 ; up 4..7]
    assert tpl.shard_tensor(gate_up, 0, 2, 0, stride=2).tolist() == [0, 1, 4, 5]
    assert tpl.shard_tensor(gate_up, 0, 2, 1, stride=2).tolist() == [2, 3, 6, 7]


def test_shard_errors_name_the_fix():
    with pytest.raises(ValueError, match="tensor-model-parallel-size"):
        tpl.shard_tensor(torch.zeros(6), 0, 4, 0)
    with pytest.raises(ValueError, match="tp rank"):
        tpl.shard_tensor(torch.zeros(8), 0, 2, 2)


def test_pad_vocab_size():
    assert tpl.pad_vocab_size(50257, 128, 1) == 50304
    assert tpl.pad_vocab_size(50257, 128, 2) == 50432
    assert tpl.pad_vocab_size(32000, 128, 4) == 32256
    assert tpl.pad_vocab_size(100, 128, 2, padded_vocab_size=102) == 102
    with pytest.raises(ValueError, match="tensor-model-parallel-size"):
        tpl.pad_vocab_size(100, 128, 4, padded_vocab_size=102)
    with pytest.raises(ValueError, match="smaller"):
        tpl.pad_vocab_size(100, 128, 1, padded_vocab_size=99)


# ---------------------------------------------------------------- layers at tp = 1
def _copy_init(w):
    return lambda t: t.copy_(w)


def test_tp1_linear_layers_equal_nn_linear():
    state = ParallelState.single()
    ref = torch.nn.Linear(6, 10)
    x = torch.randn(4, 3, 6)
    col = tpl.ColumnParallelLinear(6, 10, state=state, init_method=_copy_init(ref.weight.detach()),
                                   skip_bias_add=True)
    row = tpl.RowParallelLinear(6, 10, state=state, init_method=_copy_init(ref.weight.detach()))
    with torch.no_grad():
        col.bias.copy_(ref.bias)
        row.bias.copy_(ref.bias)
    out, bias = col(x)
    assert bias is col.bias
    torch.testing.assert_close(out + bias, ref(x))
    out, bias = row(x)
    assert bias is None
    torch.testing.assert_close(out, ref(x))
    # The weight override (tied output head) replaces the layer's own weight.
    other = torch.randn(10, 6)
    torch.testing.assert_close(col(x, weight=other)[0], x @ other.t())
    with pytest.raises(ValueError, match="weight override"):
        col(x, weight=torch.randn(6, 10))


def test_init_none_is_zeros_and_init_is_layout_independent():
    state = ParallelState.single()
    assert not tpl.ColumnParallelLinear(4, 8, state=state).weight.any()
    g = torch.Generator().manual_seed(0)
    layer = tpl.RowParallelLinear(4, 8, state=state, bias=False,
                                  init_method=lambda w: torch.nn.init.normal_(w, 0, 0.02, generator=g))
    assert layer.bias is None and layer.weight.shape == (8, 4) and layer.weight.std() > 0


def test_embedding_tp1_and_errors():
    state = ParallelState.single()
    table = torch.randn(10, 4)
    emb = tpl.VocabParallelEmbedding(10, 4, state=state, init_method=_copy_init(table))
    ids = torch.tensor([[0, 9, 3]])
    torch.testing.assert_close(emb(ids), F.embedding(ids, table))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        emb(torch.tensor([10]))
    with pytest.raises(ValueError, match="make-vocab-size-divisible-by"):
        tpl.VocabParallelEmbedding(10, 4, state=ParallelState(dims=ParallelDims(tp=4)))
    with pytest.raises(ValueError, match="sequence-parallel"):
        tpl.ColumnParallelLinear(4, 8, state=state, gather_output=True, sequence_parallel=True)


# ---------------------------------------------------------------- cross entropy, one shard
@pytest.mark.parametrize("ls", [0.0, 0.2])
@pytest.mark.parametrize("vocab,padded", [(11, 11), (11, 16)])
def test_cross_entropy_matches_torch(ls, vocab, padded):
    logits = torch.randn(5, 3, padded) * 4
    target = torch.randint(0, vocab, (5, 3))
    full, mine = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    ref = F.cross_entropy(full[..., :vocab].reshape(-1, vocab), target.reshape(-1), reduction="none",
                          label_smoothing=ls * vocab / (vocab - 1)).view(5, 3)
    loss = tpl.vocab_parallel_cross_entropy(mine, target, label_smoothing=ls,
                                            vocab_size=None if vocab == padded else vocab)
    assert loss.dtype == torch.float32 and loss.shape == target.shape
    torch.testing.assert_close(loss, ref)
    w = torch.rand(5, 3)
    (ref * w).sum().backward()
    (loss * w).sum().backward()
    torch.testing.assert_close(mine.grad, full.grad)
    assert not mine.grad[..., vocab:].any()


def test_cross_entropy_half_precision_input_gets_fp32_loss():
    logits = torch.randn(4, 8).to(torch.bfloat16).requires_grad_(True)
    target = torch.tensor([0, 1, 7, 3])
    loss = tpl.vocab_parallel_cross_entropy(logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(logits.float(), target, reduction="none"))
    loss.sum().backward()
    assert loss.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16


def test_cross_entropy_errors():
    logits = torch.randn(4, 8)
    with pytest.raises(ValueError, match="targets must lie"):
        tpl.vocab_parallel_cross_entropy(logits, torch.tensor([0, 1, 2, 8]))
    with pytest.raises(ValueError, match="targets must lie"):
        tpl.vocab_parallel_cross_entropy(logits, torch.tensor([0, 1, 2, 6]), vocab_size=6)
    with pytest.raises(ValueError, match="disagree"):
        tpl.vocab_parallel_cross_entropy(logits, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="label-smoothing"):
        tpl.vocab_parallel_cross_entropy(logits, torch.tensor([0, 1, 2, 3]), label_smoothing=1.0)


# ---------------------------------------------------------------- RNG tracker and checkpointing
def test_tracker_fork_swaps_and_advances_streams():
    tracker = tpl.model_parallel_seed(7, ParallelState.single())
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    with tracker.fork():
        b = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before), "fork must leave the default stream untouched"
    assert not torch.equal(a, b), "the forked stream advances between forks"
    fresh = tpl.RNGStatesTracker()
    fresh.add("x", 7 + 2718)
    with fresh.fork("x"):
        assert torch.equal(torch.rand(4), a)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add(tpl.MODEL_PARALLEL_RNG, 1)
    with pytest.raises(ValueError, match="seed"):
        tracker.add("other", 7 + 2718)
    with pytest.raises(KeyError, match="model_parallel_seed"):
        with fresh.fork("missing"):
            pass


def _dropout_block(x, w, tracker, calls):
    calls.append(1)
    h = F.dropout(torch.tanh(x @ w), 0.5)
    with tracker.fork():
        h = F.dropout(h, 0.3)
    return h * 2, h.sum(dim=-1)


def _run_block(use_checkpoint):
    tracker = tpl.model_parallel_seed(3, ParallelState.single())
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    calls = []
    if use_checkpoint:
        out = tpl.checkpoint(_dropout_block, x, w, tracker, calls, tracker=tracker)
    else:
        out = _dropout_block(x, w, tracker, calls)
    # Draw from both streams between forward and backward: recompute must not see these draws.
    torch.rand(3)
    with tracker.fork():
        torch.rand(3)
    (out[0].sum() + (out[1] ** 2).sum()).backward()
    after = (torch.rand(2), tracker.get_states())
    return out, x.grad, w.grad, len(calls), after


def test_checkpoint_recompute_is_bitwise_equal_with_dropout():
    plain, ckpt = _run_block(False), _run_block(True)
    assert ckpt[3] == 2 and plain[3] == 1, "checkpoint must recompute once in backward"
    for a, b in zip(plain[0] + plain[1:3], ckpt[0] + ckpt[1:3]):
        assert torch.equal(a, b)
    assert torch.equal(plain[4][0], ckpt[4][0]), "backward recompute must not disturb the default stream"
    assert torch.equal(plain[4][1][tpl.MODEL_PARALLEL_RNG]["cpu"], ckpt[4][1][tpl.MODEL_PARALLEL_RNG]["cpu"])


def test_checkpoint_trains_parameters_of_an_input_without_grad():
    """An input without autograd history (a received activation, a frozen embedding's output) must not
    cut the recompute off: the parameters the function uses still get their gradients."""
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(5))
    layer(x).square().sum().backward()
    want = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    out = tpl.checkpoint(layer, x, params=list(layer.parameters()))
    assert out.requires_grad
    out.square().sum().backward()
    for p, g in zip(layer.parameters(), want):
        assert torch.equal(p.grad, g)
    frozen = torch.nn.Linear(8, 8).requires_grad_(False)
    assert not tpl.checkpoint(frozen, x, params=list(frozen.parameters())).requires_grad, \
        "nothing to train: no recompute in backward"


class _FakeCuda:
    """Stands in for the CUDA default generator on a CPU-only machine (a CPU generator behind
    torch.cuda's state functions), so the tracker's bookkeeping of device states can be checked here."""

    def __init__(self, monkeypatch, in_use: bool):
        self.gen = torch.Generator().manual_seed(99)
        self.in_use = in_use
        from megatron.core.tensor_parallel import random as rnd

        monkeypatch.setattr(rnd, "_cuda_in_use", lambda: self.in_use)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": self.gen.get_state())
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": self.gen.set_state(state))
        monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: self.gen.manual_seed(seed))

    def draw(self) -> torch.Tensor:
        return torch.rand(4, generator=self.gen)


@pytest.mark.parametrize("cuda_at_build", [False, True])
def test_tracker_cuda_stream_is_seeded_and_never_rewinds_the_default(monkeypatch, cuda_at_build):
    """A stream's CUDA draws come from its own seed whether CUDA was initialised before the tracker was
    built or only afterwards (the model moved to the GPU later), and the default CUDA generator is not
    rewound by a fork: the draws after a fork are not the fork's draws again."""
    cuda = _FakeCuda(monkeypatch, in_use=cuda_at_build)
    tracker = tpl.model_parallel_seed(7, ParallelState.single())
    cuda.in_use = True
    with tracker.fork():
        inside = cuda.draw()
    after = cuda.draw()
    assert not torch.equal(inside, after), "the fork rewound the default CUDA generator"
    expected = torch.rand(4, generator=torch.Generator().manual_seed(7 + 2718))
    assert torch.equal(inside, expected), "the stream's CUDA state must come from its own seed"
    with tracker.fork():
        assert torch.equal(cuda.draw(), torch.rand(8, generator=torch.Generator().manual_seed(7 + 2718))[4:])
    assert "cuda" in tracker.get_states()[tpl.MODEL_PARALLEL_RNG]


# ---------------------------------------------------------------- input range checks
def test_range_checks_read_values_on_the_cpu_only():
    """On the CPU a bad id is a ValueError naming the range found and the fix; off the CPU the values are
    never read on the host (a meta tensor has none to read: the check is queued on the device instead)."""
    from megatron.core.tensor_parallel.range_checks import check_index_range, check_token_batch

    with pytest.raises(ValueError, match=r"ids must lie in \[0, 5\) but range over \[-1, 3\]; fix it"):
        check_index_range(torch.tensor([0, 3, -1]), 5, "ids", "fix it")
    check_index_range(torch.tensor([], dtype=torch.long), 5, "ids", "fix it")
    check_index_range(torch.tensor([[0, 4]]), 5, "ids", "fix it")
    check_index_range(torch.empty(2, 3, dtype=torch.long, device="meta"), 5, "ids", "fix it")
    with pytest.raises(ValueError, match="--vocab-size"):
        check_token_batch(torch.tensor([[1, 64]]), 64)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 8\)"):
        tpl.vocab_parallel_cross_entropy(torch.randn(1, 8), torch.tensor([8]))


def test_embedding_and_cross_entropy_never_read_ids_off_the_cpu():
    """The layers' own checks take the device path off the CPU: with ids on the meta device (which, like
    a GPU tensor read from the host, cannot be read without a transfer) nothing is read back."""
    ids = torch.empty(2, 3, dtype=torch.long, device="meta")
    emb = tpl.VocabParallelEmbedding(10, 4, state=ParallelState.single("meta"))
    assert emb(ids).shape == (2, 3, 4)
    assert tpl.vocab_parallel_cross_entropy(torch.empty(2, 3, 10, device="meta"), ids).shape == (2, 3)


def test_training_batches_are_checked_on_their_host_copy():
    """read_text checks the batch the loader produced, before it moves to the device (where a check
    would cost a synchronisation per microbatch), with the message naming the flags to fix."""
    from types import SimpleNamespace

    from megatron.training.setup import read_text

    cfg = SimpleNamespace(model=SimpleNamespace(padded_vocab=lambda tp: 16))
    run = SimpleNamespace(state=ParallelState.single(), cfg=cfg, eod=None)
    good = read_text(run, iter([{"text": torch.tensor([[1, 2, 15]])}]))
    assert good.tolist() == [[1, 2, 15]]
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 16\) but range over \[1, 16\].*--vocab-size"):
        read_text(run, iter([{"text": torch.tensor([[1, 2, 16]])}]))
