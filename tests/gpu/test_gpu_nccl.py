"""Two GPUs or more: NCCL parity. tp 2 and pp 2 (its P2P exchanges, the world warm-up) log the losses of
one process, and the distributed optimizer follows the plain one at dp 2 -- the gloo parity tests'
harness (``run_distributed``) and workers, with the NCCL backend."""

import pytest

from megatron.testing.distributed import run_distributed
from megatron.testing.training import NO_DROPOUT, logged_losses, tiny_argv
from megatron.testing.training import losses_close as _close
from megatron.testing.training import main_worker as _worker


@pytest.fixture
def world(num_devices, backend, device_flag):
    if num_devices < 2:
        pytest.skip(f"needs 2 GPUs, {num_devices} visible")

    def run(n: int, argv: list[str]):
        return run_distributed(_worker, n, argv + ["--device", device_flag], backend=backend, timeout=300)

    return run


@pytest.mark.parametrize("layout", [dict(tensor_model_parallel_size=2), dict(pipeline_model_parallel_size=2)],
                         ids=["tp2", "pp2"])
def test_nccl_layouts_log_the_losses_of_one_process(world, layout):
    want = logged_losses(world(1, tiny_argv(**NO_DROPOUT))[0])
    got = logged_losses(world(2, tiny_argv(**NO_DROPOUT, **layout))[0])
    assert len(got) == len(want) == 4 and set(got[0]) == {"lm loss", "early loss [1]", "early loss [3]"}
    for g, w in zip(got, want):
        assert _close(g, w, 1e-4), (g, w)


def test_nccl_distributed_optimizer_follows_the_plain_one(world):
    argv = tiny_argv(train_iters=3, global_batch_size=16)
    plain = world(2, argv)[0].history
    sharded = world(2, argv + ["--use-distributed-optimizer"])[0].history
    for p, s in zip(plain, sharded):
        assert _close(s["losses"], p["losses"], 1e-5), (s, p)
        assert abs(s["grad_norm"] - p["grad_norm"]) <= 1e-5 * p["grad_norm"]
