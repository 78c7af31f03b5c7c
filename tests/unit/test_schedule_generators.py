"""Schedule generators: every one validates, 1F1B/interleaved bubble formulas, bubble filling and the
EE-Tuning stream have the promised shape."""

import warnings

import pytest

from megatron.core.pipeline_parallel import (
    ActionKind,
    Costs,
    ScheduleError,
    early_exit_bubble_filling,
    ee_tuning_stream,
    fill_counts,
    forward_only,
    interleaved_one_f_one_b,
    needs_input_grad,
    no_pipelining,
    one_f_one_b,
    simulate,
    validate,
)

SIZES = [(pp, m) for pp in (2, 4, 8) for m in (pp, 2 * pp, 4 * pp)]
K = ActionKind


def kinds(schedule, stage):
    return [a.kind for a in schedule[stage]]


@pytest.mark.parametrize("pp,m", SIZES)
def test_every_generator_validates(pp, m):
    exits = [0, pp // 2]
    for schedule in (
        one_f_one_b(pp, m),
        one_f_one_b(pp, m, exits),
        interleaved_one_f_one_b(pp, 2, m),
        forward_only(pp, m),
        forward_only(pp, m, vpp=2),
        ee_tuning_stream(pp, m, exits),
        early_exit_bubble_filling(pp, m, exits),
    ):
        validate(schedule)


def test_no_pipelining_is_gradient_accumulation():
    s = no_pipelining(3)
    validate(s)
    assert [str(a) for a in s[0]] == ["F(c0,mb0)", "B(c0,mb0)", "F(c0,mb1)", "B(c0,mb1)", "F(c0,mb2)",
                                      "B(c0,mb2)", "GRAD_SYNC(c0)"]


@pytest.mark.parametrize("pp,m", SIZES)
@pytest.mark.parametrize("fwd,bwd", [(1.0, 1.0), (1.0, 2.0)])
def test_1f1b_bubble_fraction(pp, m, fwd, bwd):
    r = simulate(one_f_one_b(pp, m), Costs(forward=fwd, backward=bwd))
    assert r.bubble_fraction == pytest.approx((pp - 1) / (m + pp - 1), abs=1e-12)
    assert r.makespan == pytest.approx((m + pp - 1) * (fwd + bwd))


@pytest.mark.parametrize("pp,m", SIZES)
def test_interleaved_bubble_shrinks_by_vpp(pp, m):
    r = simulate(interleaved_one_f_one_b(pp, 2, m), Costs(forward=0.5, backward=1.0))
    assert r.bubble_fraction == pytest.approx((pp - 1) / (2 * m + pp - 1), abs=1e-12)


def test_interleaved_needs_multiple_of_pp():
    with pytest.raises(ScheduleError, match="multiple of --pipeline-model-parallel-size"):
        interleaved_one_f_one_b(4, 2, 6)
    validate(interleaved_one_f_one_b(4, 3, 8))


def test_1f1b_steady_state_batches_send_with_receive():
    s = one_f_one_b(4, 8)
    acts = s[1]
    for i, a in enumerate(acts[:-1]):
        if a.kind is K.SEND_F and any(b.kind is K.B for b in acts[i:]):
            assert acts[i + 1].kind in (K.RECV_B, K.RECV_F), f"SEND_F at {i} not batched: {acts[i + 1]}"
    assert needs_input_grad(s, 0) == frozenset()
    assert needs_input_grad(s, 1) == {(0, mb) for mb in range(8)}


def test_forward_only_has_no_backward():
    s = forward_only(4, 8, vpp=2)
    assert all(a.kind in (K.F_NOGRAD, K.SEND_F, K.RECV_F) for st in s for a in s[st])


@pytest.mark.parametrize("pp,m", SIZES)
def test_ee_tuning_stream_sends_nothing_backward(pp, m):
    exits = sorted({0, pp // 2})
    s = ee_tuning_stream(pp, m, exits)
    for stage in s:
        ks = kinds(s, stage)
        assert K.SEND_B not in ks and K.RECV_B not in ks and K.B not in ks
        if stage > exits[-1]:
            assert ks == []
        elif stage in exits:
            assert ks.count(K.B_EXIT) == m and ks.count(K.F) == m
        else:
            assert ks.count(K.F_NOGRAD) == m and ks.count(K.GRAD_SYNC) == 0


def test_fill_counts_rule():
    assert fill_counts(4, 2.0) == (2, 2)
    assert fill_counts(8, 2.0) == (4, 4)
    assert fill_counts(4, 1.0) == (1, 1)
    assert fill_counts(4, 2.0, 1, 0) == (1, 0)
    with pytest.warns(UserWarning, match="--num-fill-warmup-microbatches=5"):
        assert fill_counts(4, 2.0, 5, None) == (2, 2)
    with pytest.raises(ScheduleError, match="--num-fill-cooldown-microbatches must be >= 0"):
        fill_counts(4, 2.0, 1, -1)
    with pytest.raises(ScheduleError, match="pipeline-model-parallel-size > 1"):
        fill_counts(1, 2.0)
    with pytest.raises(ScheduleError, match="--backward-forward-ratio"):
        fill_counts(4, 0.0)


def test_filling_matches_ee_llm_counts_with_global_ids():
    """P=4, R=2, exits everywhere: the reference's table (2 fills reach stage 0, 1 reaches stage 1;
    stages 2 and 3 backprop 1 and 2 cool-down fills), but with ids shared by every stage."""
    s = early_exit_bubble_filling(4, 8, [0, 1, 2, 3])
    assert s.header.fill_warmup == ((8, 1), (9, 0))
    assert s.header.fill_cooldown == ((10, 2), (11, 3))
    assert s.header.num_microbatches_total == 12
    assert [a.kind for a in s[0] if a.mb == 9] == [K.F, K.B_EXIT]
    assert [a.kind for a in s[1] if a.mb == 8] == [K.RECV_F, K.F, K.B_EXIT, K.SEND_B]
    assert [a.kind for a in s[1] if a.mb == 10] == [K.RECV_F, K.F_NOGRAD, K.SEND_F]
    assert [a.kind for a in s[2] if a.mb == 10] == [K.RECV_F, K.F, K.SEND_F, K.RECV_B, K.B_TRUNC]
    assert all(a.mb != 8 for a in s[2]) and all(a.mb != 11 for a in s[2] if a.kind in (K.B, K.B_TRUNC))


def test_filling_uses_the_ratio():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = early_exit_bubble_filling(4, 8, [0, 1], backward_forward_ratio=1.0)
    assert len(s.header.fill_warmup) <= 1 and len(s.header.fill_cooldown) <= 1
    assert s.header.backward_forward_ratio == 1.0


PLAIN = Costs.from_ratio(2.0)
EXIT_COST = Costs.from_ratio(2.0, exit_forward=0.25, exit_backward=0.5)  # exit heads cost extra
FILL_CASES = [(pp, m, exits, PLAIN) for pp, m in [(4, 4), (4, 8), (4, 16), (8, 8), (8, 16)]
              for exits in ([0, 1], [1, 2], [1])]
FILL_CASES += [(4, m, [0, 1], EXIT_COST) for m in (4, 8, 16)]
FILL_CASES += [(8, m, exits, EXIT_COST) for m in (8, 16) for exits in ([0, 1], [1, 2], [1])]
FILL_CASES = [pytest.param(pp, m, ex, c, id=f"pp{pp}-m{m}-exits{'_'.join(map(str, ex))}-"
                                            f"{'exitcost' if c is EXIT_COST else 'plain'}")
              for pp, m, ex, c in FILL_CASES]


@pytest.mark.parametrize("pp,m,exits,costs", FILL_CASES)
def test_filling_never_lengthens_and_fills_idle(pp, m, exits, costs):
    base = simulate(one_f_one_b(pp, m, exits), costs)
    s = early_exit_bubble_filling(pp, m, exits, costs=costs)
    validate(s)
    r = simulate(s, costs)
    assert r.makespan <= base.makespan + 1e-9
    filled = {st for _, d in s.header.fill_warmup for st in range(d + 1)}
    filled |= {st for _, t in s.header.fill_cooldown for st in range(pp)}
    assert filled, "nothing was filled: the test would be vacuous"
    for st in filled:
        assert r.idle[st] < base.idle[st] - 1e-9, f"stage {st} idle {r.idle[st]} vs {base.idle[st]}"


def test_filling_rejects_bad_requests():
    with pytest.raises(ScheduleError, match="needs at least one early exit"):
        early_exit_bubble_filling(4, 8, [])
    with pytest.raises(ScheduleError, match="exit positions"):
        early_exit_bubble_filling(4, 8, [4])
    with pytest.raises(ScheduleError, match="--num-microbatches"):
        early_exit_bubble_filling(4, 0, [1])


def test_filling_adds_nothing_when_no_bubble_has_room():
    """Exit heads on stage 1 make it the bottleneck at pp=4: no fill fits, and the schedule is 1F1B."""
    s = early_exit_bubble_filling(4, 8, [1], costs=EXIT_COST)
    assert s.header.fill_warmup == () and s.header.fill_cooldown == ()
    assert dict(s.actions) == dict(one_f_one_b(4, 8, [1]).actions)
