"""Each tensor-parallel mapping, forward and backward, equals the single-process math (tp = 1, 2, 4).

Every rank can rebuild every other rank's inputs and upstream gradients from seeded generators, so each
rank checks its own slice against the serial reference computed locally."""

import pytest
import torch

from megatron.core import tensor_parallel as tpl
from megatron.core.parallel_state import ParallelDims, ParallelState
from megatron.testing.distributed import run_distributed

SHAPE = (8, 3, 12)  # [s, b, h]: s and h divisible by 4


def _rand(tag: int, rank: int, shape=SHAPE) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * tag + rank)
    return torch.randn(shape, generator=g)


def _chunk(x, dim, tp, r):
    return x.chunk(tp, dim=dim)[r]


def _run(fn, x, grad):
    x = x.clone().requires_grad_(True)
    y = fn(x)
    y.backward(grad)
    return y.detach(), x.grad


def _check_mappings(rank, world):
    state = ParallelState.build(ParallelDims(tp=world))
    g, tp, r = state.tp_group, world, state.tp_rank
    same = _rand(1, 0)  # replicated tensor, identical on every rank
    per_rank = [_rand(2, k) for k in range(tp)]  # a different tensor on each rank
    grads = [_rand(3, k) for k in range(tp)]  # a different upstream gradient on each rank
    total_x, total_g = sum(per_rank), sum(grads)
    cases = {
        # name: (mapping, input, upstream grad, expected output, expected input grad)
        "copy": (tpl.copy_to_tensor_model_parallel_region, same, grads[r], same, total_g),
        "reduce": (tpl.reduce_from_tensor_model_parallel_region, per_rank[r], same, total_x, same),
        "scatter_last": (tpl.scatter_to_tensor_model_parallel_region, same, _chunk(total_g, -1, tp, r),
                         _chunk(same, -1, tp, r), total_g),
        "gather_last": (tpl.gather_from_tensor_model_parallel_region, _chunk(total_x, -1, tp, r), same,
                        total_x, _chunk(same, -1, tp, r)),
        "scatter_first": (tpl.scatter_to_sequence_parallel_region, same, _chunk(total_g, 0, tp, r),
                          _chunk(same, 0, tp, r), total_g),
        "gather_first_tp_grad": (lambda x: tpl.gather_from_sequence_parallel_region(x, g), _chunk(total_x, 0, tp, r),
                                 grads[r], total_x, _chunk(total_g, 0, tp, r)),
        "gather_first_no_tp_grad": (lambda x: tpl.gather_from_sequence_parallel_region(x, g, False),
                                    _chunk(total_x, 0, tp, r), same, total_x, _chunk(same, 0, tp, r)),
        "reduce_scatter": (tpl.reduce_scatter_to_sequence_parallel_region, per_rank[r], _chunk(total_g, 0, tp, r),
                           _chunk(total_x, 0, tp, r), total_g),
    }
    for name, (mapping, x, grad, want_y, want_grad) in cases.items():
        fn = mapping if name.startswith("gather_first") else (lambda x, m=mapping: m(x, g))
        y, x_grad = _run(fn, x, grad)
        torch.testing.assert_close(y, want_y, msg=f"{name} forward, rank {rank}")
        torch.testing.assert_close(x_grad, want_grad, msg=f"{name} backward, rank {rank}")
    return sorted(cases)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_mappings_match_serial_math(tp):
    results = run_distributed(_check_mappings, tp)
    assert all(len(names) == 8 for names in results)


def _bad_split(rank, world):
    state = ParallelState.build(ParallelDims(tp=world))
    tpl.scatter_to_sequence_parallel_region(torch.zeros(3, 2), state.tp_group)


def test_split_refuses_indivisible_size():
    with pytest.raises(Exception, match="tensor-model-parallel-size"):
        run_distributed(_bad_split, 2)
