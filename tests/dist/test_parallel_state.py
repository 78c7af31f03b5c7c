"""ParallelState built in real gloo worlds: groups, coordinates and neighbours agree with the grid."""

import time

import pytest
import torch
import torch.distributed as dist

from megatron.core.parallel_state import ParallelDims, ParallelState, RankGrid
from megatron.testing.distributed import DistributedTestError, run_distributed


def _check_state(rank, world, tp, pp):
    dims = ParallelDims.from_world(world, tp=tp, pp=pp)
    state = ParallelState.build(dims)
    t, d, p = RankGrid(dims).coords(rank)
    assert (state.tp_rank, state.dp_rank, state.pp_rank) == (t, d, p)
    # all_reduce of the rank over each group equals the sum of the grid's member list
    out = {}
    for name, group, ranks in (("tp", state.tp_group, state.tp_ranks), ("dp", state.dp_group, state.dp_ranks),
                               ("pp", state.pp_group, state.pp_ranks)):
        x = torch.tensor([float(rank)])
        if group is not None:
            dist.all_reduce(x, group=group)
        out[name] = (x.item(), float(sum(ranks)))
    tied = state.new_stage_group([0, pp - 1])
    return out, state.next_rank, state.prev_rank, state.is_first_stage, state.is_last_stage, tied is not None


@pytest.mark.parametrize("tp,pp,world", [(2, 2, 4), (1, 4, 4), (2, 1, 4), (2, 2, 8)])
def test_groups_match_grid(tp, pp, world):
    results = run_distributed(_check_state, world, tp, pp)
    grid = RankGrid(ParallelDims.from_world(world, tp=tp, pp=pp))
    for rank, (sums, nxt, prv, first, last, in_tied) in enumerate(results):
        for name, (got, want) in sums.items():
            assert got == want, (rank, name)
        _, _, stage = grid.coords(rank)
        assert first == (stage == 0) and last == (stage == pp - 1)
        assert (nxt is None) == last and (prv is None) == first
        if nxt is not None:
            assert grid.coords(nxt)[2] == stage + 1 and grid.coords(nxt)[:2] == grid.coords(rank)[:2]
        assert in_tied == (pp > 1 and stage in (0, pp - 1))


def _raise_on_rank_one(rank, world):
    if rank == 1:
        raise ValueError("boom on one")
    return rank


def test_harness_reports_failing_rank():
    with pytest.raises(DistributedTestError, match="rank 1") as err:
        run_distributed(_raise_on_rank_one, 2)
    assert "boom on one" in str(err.value)


def _hang(rank, world):
    if rank == 0:
        time.sleep(60)


def test_harness_times_out():
    with pytest.raises(DistributedTestError, match="did not finish"):
        run_distributed(_hang, 2, timeout=3)


def _first_world_operation(rank, world):
    """Record the communication calls from ParallelState.build to the first pipeline exchange."""
    from megatron.core.pipeline_parallel.p2p import PipelineP2P

    calls = []
    for name in ("all_reduce", "barrier", "broadcast", "batch_isend_irecv"):
        original = getattr(dist, name)

        def record(*args, _name=name, _original=original, **kwargs):
            group = kwargs.get("group")
            calls.append((_name, group is None or group is dist.group.WORLD))
            return _original(*args, **kwargs)

        setattr(dist, name, record)
    state = ParallelState.build(ParallelDims(pp=2))
    if state.pp_rank == 0:
        PipelineP2P(state).exchange(sends=[(torch.ones(3), 1)])
    else:
        got = PipelineP2P(state).exchange(recvs=[((3,), torch.float32, 0)])[0]
        assert torch.equal(got, torch.ones(3))
    return calls


def test_first_operation_on_the_world_is_a_collective():
    """The pipeline's first exchange (a batched P2P) is never the first operation on the world group:
    PyTorch leaves that undefined under NCCL unless every rank joins. ParallelState.build warms the group
    up with an all-reduce every rank takes part in."""
    for calls in run_distributed(_first_world_operation, 2):
        assert calls[0] == ("all_reduce", True), calls
        assert ("batch_isend_irecv", True) in calls


def _rank_sum(rank, world):
    x = torch.tensor([float(rank)])
    dist.all_reduce(x)
    return dist.get_backend(), x.item()


def test_harness_spawns_workers_too():
    """The start method NCCL worlds use (spawn: a forked child cannot use CUDA once the parent has),
    exercised with gloo: module-level functions run and report."""
    assert run_distributed(_rank_sum, 2, start_method="spawn", timeout=120) == [("gloo", 1.0), ("gloo", 1.0)]


def test_harness_refuses_unknown_backends_and_missing_gpus():
    with pytest.raises(ValueError, match="backend must be one of"):
        run_distributed(_rank_sum, 2, backend="mpi")
    if torch.cuda.device_count() < 64:
        with pytest.raises(DistributedTestError, match="needs 64 GPUs"):
            run_distributed(_rank_sum, 64, backend="nccl")
