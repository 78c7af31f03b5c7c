"""Checkpoints across gloo ranks: file names per (tp, pp), per-dp RNG states, atomicity under a kill,
distributed-optimizer shards across a dp change, and SIGTERM agreement for --exit-signal-handler."""

import argparse
import io
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from megatron.core.distributed.grad_buffer import GradBuffers
from megatron.core.parallel_state import ParallelDims, ParallelState
from megatron.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.testing.distributed import DistributedTestError, run_distributed
from megatron.checkpoint import checkpoint_file, load_checkpoint, read_tracker, save_checkpoint
from megatron.training.signal_handler import DistributedSignalHandler


@pytest.fixture(scope="module", autouse=True)
def _optimizer_imports_before_fork():
    """torch's first optimizer step imports torch._dynamo (seconds); doing it once here lets every forked
    worker inherit the modules instead of importing them again on the two CPU cores."""
    p = torch.nn.Parameter(torch.zeros(1))
    p.grad = torch.ones(1)
    torch.optim.AdamW([p]).step()


def _args(tp, pp, **kw):
    return argparse.Namespace(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, **kw)


def _rank_model(state):
    torch.manual_seed(100 * state.pp_rank + state.tp_rank)
    return torch.nn.Linear(3, 2)


def _save_and_reload(rank, world, tp, pp, root):
    state = ParallelState.build(ParallelDims.from_world(world, tp=tp, pp=pp))
    model = _rank_model(state)
    torch.manual_seed(1000 + rank)  # every rank's generator differs, also across dp
    save_checkpoint(root, 7, [model], None, None, state, _args(tp, pp))
    expected = torch.rand(4)
    fresh = torch.nn.Linear(3, 2)
    torch.manual_seed(0)
    it = load_checkpoint(root, [fresh], None, None, state, _args(tp, pp))
    return it, state.tp_rank, state.pp_rank, torch.equal(torch.rand(4), expected), fresh.weight.detach().clone()


@pytest.mark.parametrize("tp, pp, dp", [(2, 2, 1), (1, 2, 2)])
def test_files_per_rank_and_rng_per_dp_rank(tmp_path, tp, pp, dp):
    results = run_distributed(_save_and_reload, tp * pp * dp, tp, pp, str(tmp_path))
    names = sorted(os.listdir(tmp_path / "iter_0000007"))
    assert names == sorted([f"mp_rank_{t:02d}_{p:03d}" for t in range(tp) for p in range(pp)] + ["manifest.json"])
    assert read_tracker(str(tmp_path)) == (7, False)
    for it, t, p, rng_ok, weight in results:
        assert it == 7 and rng_ok
        ckpt = torch.load(checkpoint_file(str(tmp_path), 7, t, p, pp), weights_only=False)
        assert torch.equal(ckpt["model"]["weight"], weight)
        assert len(ckpt["rng_state"]) == dp  # one entry per data-parallel rank of this (tp, pp)
        assert ckpt["args"].tensor_model_parallel_size == tp and ckpt["args"].data_parallel_size == dp


def _die_midway(obj, f, *args, **kwargs):
    """torch.save that writes half of the file and kills the process (no cleanup, like SIGKILL)."""
    buf = io.BytesIO()
    _REAL_SAVE(obj, buf)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    f.flush()
    os._exit(1)


_REAL_SAVE = torch.save


def _killed_during_second_save(rank, world, root):
    state = ParallelState.build(ParallelDims.from_world(world, tp=2))
    model = _rank_model(state)
    save_checkpoint(root, 1, [model], None, None, state, _args(2, 1))
    with torch.no_grad():
        model.weight.add_(1.0)
    if rank == 1:
        torch.save = _die_midway  # forked worker: the patch dies with it
    save_checkpoint(root, 2, [model], None, None, state, _args(2, 1))


def test_kill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    root = str(tmp_path)
    # Rank 1 dies writing its file; rank 0 (whose file is complete) fails at the barrier.
    with pytest.raises(DistributedTestError):
        run_distributed(_killed_during_second_save, 2, root, timeout=60)
    assert read_tracker(root) == (1, False)
    assert os.path.isfile(checkpoint_file(root, 2, 0, 0, 1))
    assert not os.path.exists(checkpoint_file(root, 2, 1, 0, 1))  # only a torn temporary file there
    for tp_rank in range(2):
        state = ParallelState(dims=ParallelDims(tp=2), rank=tp_rank)
        fresh = torch.nn.Linear(3, 2)
        assert load_checkpoint(root, [fresh], None, None, state, _args(2, 1)) == 1
        want = _rank_model(state)
        assert torch.equal(fresh.weight, want.weight) and torch.equal(fresh.bias, want.bias)


# ---------------------------------------------------------------- distributed optimizer across a dp change
STEPS = 4


def _grads(step):
    g = torch.Generator().manual_seed(step)
    return [torch.randn(5, 6, generator=g), torch.randn(5, generator=g), torch.randn(3, 5, generator=g),
            torch.randn(3, generator=g)]


def _dist_opt_setup(state):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)).to(torch.bfloat16)
    buffers = GradBuffers(model.parameters(), state.dp_group, state.dp, bucket_size=16, reduce_scatter=True)
    cfg = OptimizerConfig(lr=0.01, bf16=True, use_distributed_optimizer=True).validate()
    return model, buffers, get_megatron_optimizer(cfg, [model], state, [buffers])


def _steps(model, buffers, opt, steps):
    for step in steps:
        buffers.zero_grad()
        for p, g in zip(model.parameters(), _grads(step)):
            p.main_grad.copy_(g)  # the same gradient on every dp rank: its dp mean is itself
        buffers.start_grad_sync()
        buffers.finish_grad_sync()
        assert opt.step()[0]


def _dist_opt_run(rank, world, root, save_at, load):
    state = ParallelState.build(ParallelDims.from_world(world)) if world > 1 else ParallelState.single()
    model, buffers, opt = _dist_opt_setup(state)
    args = _args(1, 1, use_distributed_optimizer=True)
    start = load_checkpoint(root, [model], opt, None, state, args) if load else 0
    _steps(model, buffers, opt, range(start, save_at))
    if not load:
        save_checkpoint(root, save_at, [model], opt, None, state, args)
    _steps(model, buffers, opt, range(save_at, STEPS))
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("saved_dp, loaded_dp", [(2, 1), (1, 2), (2, 3)])
def test_distributed_optimizer_resumes_at_another_dp(tmp_path, saved_dp, loaded_dp):
    root = str(tmp_path)

    def run(dp, load):  # dp 3 cuts the 16-element buckets unevenly against dp 2
        if dp == 1:
            return [_dist_opt_run(0, 1, root, 2, load)]
        return run_distributed(_dist_opt_run, dp, root, 2, load)

    straight = run(saved_dp, load=False)
    assert os.path.isfile(os.path.join(os.path.dirname(checkpoint_file(root, 2, 0, 0, 1)), "distrib_optim.pt"))
    resumed = run(loaded_dp, load=True)
    for got in resumed:
        assert all(torch.equal(a, b) for a, b in zip(straight[0], got))


# ---------------------------------------------------------------- SIGTERM agreement
def _signal_loop(rank, world):
    with DistributedSignalHandler(signal.SIGTERM) as handler:
        pids = [None] * world
        dist.all_gather_object(pids, os.getpid())
        stop = None
        for it in range(200):
            if it == 3 and rank == 0:
                os.kill(pids[world - 1], signal.SIGTERM)  # the scheduler signals one process only
            if handler.signals_received():
                stop = it
                break
            time.sleep(0.005)
        local = handler.received_locally
    assert signal.getsignal(signal.SIGTERM) is not handler._record
    return stop, local


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_iteration():
    results = run_distributed(_signal_loop, 3)
    stops = {stop for stop, _ in results}
    assert len(stops) == 1 and stops.pop() is not None
    assert [local for _, local in results] == [False, False, True]
