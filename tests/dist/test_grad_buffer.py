"""Data-parallel gradient buffers: bucketed all-reduce / reduce-scatter equal the serial mean gradient."""

import pytest
import torch

from megatron.core.distributed.grad_buffer import GradBuffers
from megatron.core.parallel_state import ParallelDims, ParallelState
from megatron.testing.distributed import run_distributed


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))


def _data(dp, microbatches):
    g = torch.Generator().manual_seed(1)
    return torch.randn(dp, microbatches, 4, 6, generator=g)


def _reference(dp, microbatches):
    model = _model()
    x = _data(dp, microbatches)
    for r in range(dp):
        for m in range(microbatches):
            (model(x[r, m]).square().mean() / (microbatches * dp)).backward()
    return [p.grad.clone() for p in model.parameters()]


def _train(rank, world, overlap, reduce_scatter, bucket_size, microbatches):
    state = ParallelState.build(ParallelDims.from_world(world))
    model = _model()
    buffers = GradBuffers(model.parameters(), state.dp_group, state.dp, bucket_size=bucket_size,
                          overlap=overlap, reduce_scatter=reduce_scatter)
    x = _data(world, microbatches)[rank]
    for m in range(microbatches):
        if m == microbatches - 1:
            buffers.start_grad_sync()
        (model(x[m]).square().mean() / microbatches).backward()
    buffers.finish_grad_sync()
    assert all(p.grad is None for p in model.parameters())
    shards = [b.shard(world, rank) for b in buffers.buckets]
    return [p.main_grad.clone() for p in model.parameters()], buffers.buffers[torch.float32].clone(), shards


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("bucket_size", [1, 30, 10**9])
def test_all_reduce_equals_serial(overlap, bucket_size):
    ref = _reference(2, 3)
    for grads, _, _ in run_distributed(_train, 2, overlap, False, bucket_size, 3):
        for got, want in zip(grads, ref):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_reduce_scatter_leaves_each_rank_its_shard():
    world, mb = 4, 2
    ref = _reference(world, mb)
    # the reference buffer in the same layout: run dp=1 buffers on the serial gradients
    model = _model()
    layout = GradBuffers(model.parameters(), None, world, bucket_size=30)
    for p, g in zip(model.parameters(), ref):
        p.main_grad.copy_(g)
    full = layout.buffers[torch.float32]
    for rank, (_, buffer, shards) in enumerate(run_distributed(_train, world, True, True, 30, mb)):
        for lo, hi in shards:
            assert (hi - lo) * world > 0
            torch.testing.assert_close(buffer[lo:hi], full[lo:hi], rtol=1e-6, atol=1e-7)


def test_second_gradient_after_launch_is_an_error():
    model = torch.nn.Linear(3, 2)
    buffers = GradBuffers(model.parameters(), None, 1, overlap=True)
    buffers.start_grad_sync()
    model(torch.ones(1, 3)).sum().backward()
    with pytest.raises(RuntimeError, match="already started"):
        model(torch.ones(1, 3)).sum().backward()
