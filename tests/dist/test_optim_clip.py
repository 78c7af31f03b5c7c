"""Global gradient norm and clipping over tp x pp (x dp) shards equal torch's clip_grad_norm_ on the full
model in one process: tp shards summed, tp-replicated parameters and tied (``shared``) copies counted once,
inf/nan on one rank skipping the step everywhere, and a stage with nothing to train taking part."""

import pytest
import torch

from megatron.core.distributed.grad_buffer import GradBuffers
from megatron.core.parallel_state import ParallelDims, ParallelState
from megatron.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.testing.distributed import run_distributed

CLIP = 0.5
# name: (full shape, stage, tp split dim or None for replicated)
LAYOUT = {
    "w1": ((8, 6), 0, 0),      # column-parallel weight
    "b1": ((8,), 0, 0),        # column-parallel bias
    "norm": ((6,), 0, None),   # replicated norm weight
    "emb": ((10, 6), 0, 0),    # vocab-parallel embedding, tied with stage 1's copy
    "w2": ((6, 8), 1, 1),      # row-parallel weight
    "b2": ((6,), 1, None),     # row-parallel bias: replicated
}


def _full():
    g = torch.Generator().manual_seed(0)
    params = {k: torch.randn(shape, generator=g) for k, (shape, _, _) in LAYOUT.items()}
    grads = {k: torch.randn(shape, generator=g) for k, (shape, _, _) in LAYOUT.items()}
    noise = {k: torch.randn(shape, generator=g) for k, (shape, _, _) in LAYOUT.items()}
    grads["b2"][:2] = noise["b2"][:2] = 0.0  # exact zeros for --log-num-zeros-in-grad
    return params, grads, noise


def _reference():
    params, grads, _ = _full()
    full = [torch.nn.Parameter(p.clone()) for p in params.values()]
    for p, g in zip(full, grads.values()):
        p.grad = g.clone()
    norm = torch.nn.utils.clip_grad_norm_(full, CLIP).item()
    # SGD with lr 1 and no momentum / decay: the update is exactly the clipped gradient
    zeros = sum(int((g == 0).sum()) for g in grads.values())
    return {k: p.detach() - p.grad for k, p in zip(params, full)}, norm, zeros


def _local(t, dim, tp, tp_rank):
    return t if dim is None else t.chunk(tp, dim)[tp_rank].clone()


def _worker(rank, world, tp, pp, distributed, freeze_last_stage):
    state = ParallelState.build(ParallelDims.from_world(world, tp=tp, pp=pp))
    params, grads, noise = _full()
    model, names = torch.nn.Module(), []
    for name, (_, stage, dim) in LAYOUT.items():
        tied_copy = name == "emb" and state.pp_rank == pp - 1 and pp > 1
        if stage != state.pp_rank and not tied_copy:
            continue
        p = torch.nn.Parameter(_local(params[name], dim, tp, state.tp_rank))
        if dim is not None:
            p.tensor_model_parallel = True
        p.shared = tied_copy
        p.requires_grad_(not (freeze_last_stage and state.pp_rank == pp - 1))
        setattr(model, name, p)
        names.append(name)
    buffers = GradBuffers(model.parameters(), state.dp_group, state.dp, bucket_size=20, reduce_scatter=distributed)
    cfg = OptimizerConfig(optimizer="sgd", lr=1.0, sgd_momentum=0.0, weight_decay=0.0, clip_grad=CLIP,
                          use_distributed_optimizer=distributed, log_num_zeros_in_grad=True).validate()
    opt = get_megatron_optimizer(cfg, [model], state, [buffers])
    # dp rank r sees grad + c_r * noise with sum_r c_r = 0, so the dp mean is the reference gradient
    c = state.dp_rank - (state.dp - 1) / 2
    for step in range(2):
        buffers.zero_grad()
        for name in names:
            p = getattr(model, name)
            if p.requires_grad:
                dim = LAYOUT[name][2]
                p.main_grad.copy_(_local(grads[name] + c * noise[name], dim, tp, state.tp_rank))
        if step == 1 and rank == 0:
            model.w1.main_grad[0, 0] = float("nan")
        buffers.start_grad_sync()
        buffers.finish_grad_sync()
        result = opt.step()
        if step == 0:
            first = result, {n: getattr(model, n).detach().clone() for n in names}
    return first, result, state.tp_rank, state.pp_rank


@pytest.mark.parametrize("tp, pp, dp, distributed", [
    (2, 2, 1, False),
    (2, 2, 2, False),
    (2, 2, 2, True),
    (1, 2, 4, True),
])
def test_clip_norm_equals_full_model(tp, pp, dp, distributed):
    want, want_norm, want_zeros = _reference()
    for (first, second, tp_rank, _) in run_distributed(_worker, tp * pp * dp, tp, pp, distributed, False):
        (ok, norm, zeros), weights = first
        assert ok and norm == pytest.approx(want_norm, rel=1e-6) and zeros == want_zeros
        for name, got in weights.items():
            torch.testing.assert_close(got, _local(want[name], LAYOUT[name][2], tp, tp_rank), rtol=1e-6, atol=1e-6)
        assert second == (False, None, None)  # a nan on rank 0 skips the step on every rank


def test_stage_with_nothing_to_train_takes_part():
    params, grads, _ = _full()
    stage0 = [n for n, (_, stage, _) in LAYOUT.items() if stage == 0]
    want_norm = torch.sqrt(sum(grads[n].square().sum() for n in stage0)).item()
    results = run_distributed(_worker, 2, 1, 2, False, True)
    for (ok, norm, _), weights in (r[0] for r in results):
        assert ok and norm == pytest.approx(want_norm, rel=1e-6)
    last_stage_weights = results[1][0][1]
    for name, got in last_stage_weights.items():
        assert torch.equal(got, params[name])
