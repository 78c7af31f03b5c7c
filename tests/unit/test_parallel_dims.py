"""ParallelDims validation and the pure rank grid."""

import itertools

import pytest

from megatron.config import EarlyExitConfig, ModelConfig
from megatron.core.parallel_state import ParallelConfigError, ParallelDims, RankGrid
from megatron.model import partition, tied_weight_holders

LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 2), (4, 2, 1), (2, 4, 1), (1, 2, 4), (8, 1, 1)]


@pytest.mark.parametrize("tp,pp,dp", LAYOUTS)
def test_every_rank_once_per_axis(tp, pp, dp):
    grid = RankGrid(ParallelDims(tp, pp, dp))
    world = tp * pp * dp
    for groups, size in (
        (grid.tp_groups(), tp),
        (grid.dp_groups(), dp),
        (grid.pp_groups(), pp),
        (grid.mp_groups(), tp * pp),
    ):
        flat = sorted(itertools.chain.from_iterable(groups))
        assert flat == list(range(world))
        assert all(len(g) == size for g in groups)


@pytest.mark.parametrize("tp,pp,dp", LAYOUTS)
def test_megatron_order(tp, pp, dp):
    grid = RankGrid(ParallelDims(tp, pp, dp))
    for group in grid.tp_groups():  # tp fastest: contiguous ranks
        assert group == list(range(group[0], group[0] + tp))
    for rank in range(tp * pp * dp):
        t, d, p = grid.coords(rank)
        assert grid.rank(t, d, p) == rank
        assert rank == p * tp * dp + d * tp + t
    for pipe in grid.pp_groups():
        assert [grid.coords(r)[2] for r in pipe] == list(range(pp))


def test_from_world_derives_dp():
    dims = ParallelDims.from_world(8, tp=2, pp=2)
    assert (dims.tp, dims.pp, dims.dp, dims.world_size) == (2, 2, 2, 8)


@pytest.mark.parametrize(
    "world,tp,pp,flag",
    [(6, 4, 1, "--tensor-model-parallel-size"), (4, 1, 3, "--pipeline-model-parallel-size"), (4, 0, 1, "--tensor")],
)
def test_bad_sizes_name_the_flag(world, tp, pp, flag):
    with pytest.raises(ParallelConfigError, match=flag):
        ParallelDims.from_world(world, tp=tp, pp=pp)


def test_vpp_needs_pipeline():
    with pytest.raises(ParallelConfigError, match="--num-layers-per-virtual-pipeline-stage"):
        ParallelDims(tp=1, pp=1, dp=1, vpp=2)
    assert ParallelDims(pp=2, vpp=2).chunks == 2


def test_exit_stages_and_tied_group():
    """The stages owning exits (Partition) and the holders of the tied embedding (tied_weight_holders):
    the one implementation each that the model, the schedules and the gradient reduction use."""
    # 24 layers over 4 stages; exits after 6 and 12 (stages 0, 1), pre-exits 7 and 13 (stages 1, 2)
    assert partition(24, 4, 1, [6, 12]).exit_stages == [0, 1]
    assert partition(24, 4, 1, [7, 13]).exit_stages == [1, 2]
    assert partition(24, 4, 1, [13, 7]).exit_stages == [1, 2]  # sorted whatever the input order
    assert partition(4, 2, 1, [3, 4], [3, 1]).exit_stages == [0, 1]  # uneven split
    with pytest.raises(ValueError, match="--exit-layer-nums"):
        partition(24, 4, 1, [25])
    part, model = partition(8, 4, 1, [5, 3]), ModelConfig(num_layers=8)
    tied = EarlyExitConfig(exit_layer_nums=[3, 5])
    assert tied_weight_holders(part, model, tied) == {"word_embeddings": [(0, 0), (1, 0), (2, 0), (3, 0)]}
    untied = EarlyExitConfig(exit_layer_nums=[3, 5], untie_exit_output_weights=True)
    assert tied_weight_holders(part, model, untied) == {"word_embeddings": [(0, 0), (3, 0)]}
    grid = RankGrid(ParallelDims(tp=1, pp=4, dp=4))
    # EE-LLM's set-built group came out as [8, 0, 4, 12] here; ours is sorted.
    assert grid.stage_groups([2, 0, 3, 1])[0] == [0, 4, 8, 12]


@pytest.mark.parametrize("backend", ["nccl", "gloo"])
def test_init_distributed_binds_nccl_to_the_local_gpu(monkeypatch, backend):
    """Under NCCL the process selects its GPU (LOCAL_RANK) and passes it as ``device_id``, so the world
    communicator is created at once on that GPU; gloo gets no device."""
    import torch
    import torch.distributed as dist

    from megatron.core.parallel_state import init_distributed

    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.update(kw))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.update(set_device=d))
    init_distributed(backend)
    assert calls["backend"] == backend and calls["rank"] == 3 and calls["world_size"] == 4
    if backend == "nccl":
        assert calls["device_id"] == torch.device("cuda", 1) == calls["set_device"]
    else:
        assert "device_id" not in calls and "set_device" not in calls
