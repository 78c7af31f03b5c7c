"""The schedule runtime on a toy chain model: every schedule's gradients equal one process doing the
same work (the global plan's routes), for pp in {2, 4}, vpp 2, dp 2, bubble filling and EE-Tuning.

The toy model is a chain of positions (one per (stage, chunk)); position k computes tanh(W_k x); some
positions carry an exit head (loss mean((E_k norm(h))^2)); the last position carries the final head. It has
exactly the structure the runtime sees from a real model, with none of its cost.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.core.distributed.grad_buffer import GradBuffers
from megatron.core.parallel_state import ParallelDims, ParallelState
from megatron.core.pipeline_parallel.p2p import PipelineP2P
from megatron.core.pipeline_parallel.runtime import run_schedule
from megatron.core.pipeline_parallel.schedules import (
    ActionKind,
    early_exit_bubble_filling,
    ee_tuning_stream,
    forward_only,
    interleaved_one_f_one_b,
    no_pipelining,
    one_f_one_b,
)
from megatron.testing.distributed import run_distributed

H, S, B = 4, 3, 2
EXIT_WEIGHT = {1: 0.5, 2: 0.25}  # exit "layer" number = position + 1


class Chain(torch.nn.Module):
    """Positions ``0..P-1``; exits at the given positions; final head on P-1."""

    def __init__(self, positions, exit_positions):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.w = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(H, H, generator=g) * 0.5) for _ in range(positions))
        self.e = torch.nn.ParameterDict(
            {str(p): torch.nn.Parameter(torch.randn(H, H, generator=g) * 0.5) for p in range(positions)}
        )
        self.final = torch.nn.Parameter(torch.randn(H, H, generator=g) * 0.5)
        self.exit_positions = set(exit_positions)
        self.positions = positions

    def block(self, p, x):
        h = torch.tanh(x @ self.w[p].T)
        # The exit norm saves h itself, as a post-exit head on a stage's last layer does in the model.
        exits = {}
        if p in self.exit_positions:
            exits[p + 1] = (F.layer_norm(h, (H,)) @ self.e[str(p)].T).square().mean()
        return h, exits

    def params_of(self, p):
        out = [self.w[p]]
        if p in self.exit_positions:
            out.append(self.e[str(p)])
        if p == self.positions - 1:
            out.append(self.final)
        return out


def data(dp_rank, mb):
    return torch.randn(S, B, H, generator=torch.Generator().manual_seed(1000 * dp_rank + mb))


def reference_grads(schedule, dp, exit_positions, model_positions=None):
    """One process doing the plan: per route, losses of the positions that back-propagate, inputs
    detached where the plan does not chain the gradient."""
    header = schedule.header
    model = Chain(model_positions or header.num_positions, exit_positions)
    last = model.positions - 1
    for r in range(dp):
        for route in header.routes:
            x = data(r, route.mb)
            loss = 0.0
            for p in range(route.fwd_last + 1):
                chained = route.chained and p in route.bwd and (p - 1) in route.bwd
                x, exits = model.block(p, x if chained else x.detach())
                if p in route.bwd:
                    loss = loss + sum(EXIT_WEIGHT.get(k, 1.0) * v for k, v in exits.items())
            if route.final_loss and route.fwd_last == last and last in route.bwd:
                loss = loss + (x @ model.final.T).square().mean()
            if torch.is_tensor(loss):
                (loss / (header.num_microbatches * dp)).backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def _run(rank, world, make_schedule, pp, exit_positions, model_positions=None, deallocate=True, outputs=None):
    state = ParallelState.build(ParallelDims.from_world(world, pp=pp))
    schedule = make_schedule()
    header = schedule.header
    model = Chain(model_positions or header.num_positions, exit_positions)
    stage = state.pp_rank
    mine = {c: header.position(stage, c) for c in range(header.vpp)}
    buffers = [GradBuffers(model.params_of(mine[c]), state.dp_group, state.dp) for c in range(header.vpp)]

    def forward_step(chunk, mb, x):
        p = mine[chunk]
        if p == 0:
            x = data(state.dp_rank, mb)
        h, exits = model.block(p, x)
        out = (h @ model.final.T).square().mean() if p == model.positions - 1 else h
        if outputs is not None:
            outputs.append(out)
        return SimpleNamespace(output=out, exit_losses=exits)

    losses = run_schedule(schedule, stage, forward_step, comm=PipelineP2P(state), tensor_shape=(S, B, H),
                          dtype=torch.float32, exit_weights=EXIT_WEIGHT, grad_buffers=buffers,
                          deallocate_outputs=deallocate)
    for b in buffers:
        b.finish_grad_sync()
    names = {id(p): n for n, p in model.named_parameters()}
    grads = {names[id(p)]: p.main_grad.clone() for c in mine for p in model.params_of(mine[c])}
    return grads, losses.mean()


CASES = {
    "no_pipelining": (lambda: no_pipelining(3), 1, [0]),
    "1f1b_pp2": (lambda: one_f_one_b(2, 4), 2, [0, 1]),
    "1f1b_pp4": (lambda: one_f_one_b(4, 5), 4, [1, 2]),
    "interleaved_pp2_vpp2": (lambda: interleaved_one_f_one_b(2, 2, 4), 2, [0, 2]),
    "filling_pp4": (lambda: early_exit_bubble_filling(4, 8, [0, 1], 2, 2, 2.0), 4, [0, 1]),
    "tuning_pp4": (lambda: ee_tuning_stream(4, 4, [1, 2]), 4, [1, 2]),
}


@pytest.mark.parametrize("dp", [1, 2])
@pytest.mark.parametrize("case", sorted(CASES))
def test_runtime_equals_serial_plan(case, dp):
    make, pp, exits = CASES[case]
    schedule = make()
    if case == "filling_pp4":
        assert schedule.header.fill_warmup and schedule.header.fill_cooldown, "the plan placed no fills"
    want = reference_grads(schedule, dp, exits)
    got = {}
    for grads, _ in run_distributed(_run, pp * dp, make, pp, exits):
        got.update(grads)
    assert got, "no gradients came back"
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-7, msg=f"{case}: {name}")


def test_forward_only_reports_every_loss():
    make = lambda: forward_only(2, 3)  # noqa: E731
    results = run_distributed(_run, 2, make, 2, [0, 1])
    assert set(results[0][1]) == {"early loss [1]"}
    assert set(results[1][1]) == {"early loss [2]", "lm loss"}


def test_tuning_stream_over_the_first_stages_of_a_deeper_model():
    """--tune-exit-pipeline-parallel-size 2 of a 3-stage model: the run's last stage has no head, so its
    output is a hidden state, not the final loss (the plan's final_loss says so)."""
    make = lambda: ee_tuning_stream(2, 3, [0, 1])  # noqa: E731
    want = reference_grads(make(), 1, [0, 1], model_positions=3)
    got = {}
    for grads, losses in run_distributed(_run, 2, make, 2, [0, 1], 3):
        got.update(grads)
        assert "lm loss" not in losses
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-7, msg=name)


def _fill_grads(schedule, exit_positions):
    """One process, written from the documented objective rather than from the routes' generic walk:
    each warm-up fill back-propagates its exit losses through the stages it reached, each cool-down fill
    its final and exit losses through its backward stages only; every fill is divided by m."""
    header = schedule.header
    model = Chain(header.num_positions, exit_positions)
    m, last = header.num_microbatches, header.num_positions - 1
    for mb, deepest in header.fill_warmup:
        x, loss = data(0, mb), 0.0
        for p in range(deepest + 1):
            x, exits = model.block(p, x)
            loss = loss + sum(EXIT_WEIGHT[k] * v for k, v in exits.items())
        (loss / m).backward()
    for mb, first in header.fill_cooldown:
        x, loss = data(0, mb), 0.0
        for p in range(last + 1):
            x, exits = model.block(p, x if p != first else x.detach())
            if p >= first:
                loss = loss + sum(EXIT_WEIGHT[k] * v for k, v in exits.items())
        ((loss + (x @ model.final.T).square().mean()) / m).backward()
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def test_filling_adds_fill_microbatches_to_the_plain_1f1b_objective():
    """Bubble filling's objective (issue 14, item 7): the m ordinary microbatches train exactly as in plain
    1F1B on every stage, and the fill microbatches -- read in addition to them, ids m.. -- add their
    gradients with the same 1/m weight as an ordinary microbatch, on the stages their backward reaches."""
    m, exits = 8, [0, 1]
    fill = lambda: early_exit_bubble_filling(4, m, exits, 2, 2, 2.0)  # noqa: E731
    plain = lambda: one_f_one_b(4, m)  # noqa: E731
    header = fill().header
    assert header.num_microbatches == m
    assert header.num_microbatches_total == m + len(header.fill_warmup) + len(header.fill_cooldown) > m
    assert [r.role for r in header.routes[:m]] == ["full"] * m
    got = {}
    for schedule in (fill, plain):
        got[schedule] = {}
        for grads, _ in run_distributed(_run, 4, schedule, 4, exits):
            got[schedule].update(grads)
    extra = _fill_grads(fill(), exits)
    assert any(g.abs().sum() > 0 for g in extra.values())
    for name, g in got[fill].items():
        torch.testing.assert_close(g - got[plain][name], extra[name], rtol=1e-5, atol=1e-7, msg=name)


def _freed_outputs(rank, world, make_schedule, pp, exits, deallocate):
    """Grads, and of the outputs sent with a graph: how many, how many freed; also whether every other
    output kept its data."""
    outputs = []
    grads, _ = _run(rank, world, make_schedule, pp, exits, deallocate=deallocate, outputs=outputs)
    actions = make_schedule()[dist.get_rank()]
    sends = {(a.chunk, a.mb) for a in actions if a.kind is ActionKind.SEND_F}
    forwards = [a for a in actions if a.kind in (ActionKind.F, ActionKind.F_NOGRAD)]
    assert len(forwards) == len(outputs)
    freed = [t.dim() > 0 and t.untyped_storage().nbytes() <= t.element_size() for t in outputs]
    sent = [f for a, t, f in zip(forwards, outputs, freed) if (a.chunk, a.mb) in sends and t.requires_grad]
    others = [f for a, t, f in zip(forwards, outputs, freed) if (a.chunk, a.mb) not in sends or not t.requires_grad]
    return grads, len(sent), sum(sent), not any(others)


@pytest.mark.parametrize("case", sorted(c for c in CASES if CASES[c][1] > 1))
def test_sent_outputs_are_freed_without_changing_a_gradient(case):
    """Issue 14, item 11: every sent output that carries a graph has its data freed after the send, and
    the gradients equal, bit for bit, those of the run that keeps them. The toy's tanh and exit head save
    the very tensor that is sent (what a post-exit head does in the real model): freeing it must not
    change what they saved."""
    make, pp, exits = CASES[case]
    kept = run_distributed(_freed_outputs, pp, make, pp, exits, False)
    freed = run_distributed(_freed_outputs, pp, make, pp, exits, True)
    assert sum(r[1] for r in freed) > 0, "no output with a graph was sent"
    for (g_kept, n, n_freed_kept, others_kept), (g_freed, n2, n_freed, others_intact) in zip(kept, freed):
        assert n == n2 and n_freed_kept == 0 and n_freed == n and others_kept and others_intact
        for name, g in g_kept.items():
            assert torch.equal(g_freed[name], g), f"{case}: {name}"
