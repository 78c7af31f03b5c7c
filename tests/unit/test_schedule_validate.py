"""The validator catches hand-made broken schedules with precise messages; the simulator times them."""

import pytest

from megatron.core.pipeline_parallel import (
    Action,
    ActionKind,
    Costs,
    Route,
    Schedule,
    ScheduleError,
    ScheduleHeader,
    ascii_grid,
    forward_only,
    one_f_one_b,
    simulate,
    validate,
)
from megatron.core.pipeline_parallel.schedules.engine import run_timeline

K = ActionKind


def F(mb):
    return Action(K.F, mb)


def B(mb):
    return Action(K.B, mb)


def SF(mb):  # stage 0 -> 1
    return Action(K.SEND_F, mb, 0, 1, 0)


def RF(mb):  # stage 1 <- 0
    return Action(K.RECV_F, mb, 0, 0, 0)


def SB(mb):  # stage 1 -> 0
    return Action(K.SEND_B, mb, 0, 0, 0)


def RB(mb):  # stage 0 <- 1
    return Action(K.RECV_B, mb, 0, 1, 0)


SYNC = Action(K.GRAD_SYNC, -1, 0)
STAGE1_OK = [RF(0), F(0), B(0), SB(0), RF(1), F(1), B(1), SB(1), SYNC]


def two_stage(stage0, stage1=STAGE1_OK):
    return Schedule(one_f_one_b(2, 2).header, {0: tuple(stage0), 1: tuple(stage1)})


def test_reference_two_stage_schedule_is_valid():
    validate(two_stage([F(0), SF(0), F(1), SF(1), RB(0), B(0), RB(1), B(1), SYNC]))
    assert dict(one_f_one_b(2, 2).actions)[1] == tuple(STAGE1_OK)


def test_catches_deadlock():
    # Stage 0 waits for mb 0's gradient before sending mb 0's activation.
    bad = two_stage([F(0), RB(0), F(1), SF(0), SF(1), B(0), RB(1), B(1), SYNC])
    with pytest.raises(ScheduleError, match=r"deadlock: stage 0 blocked in batch \[RECV_B\(c0,mb0<-s1c0\)\]"):
        validate(bad)


def test_unbatched_1f1b_exchange_deadlocks():
    """Splitting 1F1B's steady 'SEND_F + RECV_B' batch deadlocks: the rule that adjacent
    communication actions form one batch is what keeps the real schedule alive."""
    good = one_f_one_b(2, 3)

    def split(actions, first, second):
        out = list(actions)
        i = next(i for i, a in enumerate(out) if a.kind is first and out[i + 1].kind is second)
        out.insert(i + 1, SYNC)  # any non-communication action between the two ends the batch
        return tuple(out)

    s0 = split(good[0], K.SEND_F, K.RECV_B)
    s1 = split(good[1], K.SEND_B, K.RECV_F)
    run_timeline(Schedule(good.header, {0: s0, 1: good[1]}), lambda s, a: 1.0)  # one side split: fine
    with pytest.raises(ScheduleError, match=r"deadlock: stage 0 blocked in batch \[SEND_F\(c0,mb1->s1c0\)\]"):
        run_timeline(Schedule(good.header, {0: s0, 1: s1}), lambda s, a: 1.0)


def test_catches_backward_before_forward():
    stage1 = [RF(0), B(0), F(0), SB(0), RF(1), F(1), B(1), SB(1), SYNC]
    with pytest.raises(ScheduleError, match=r"stage 1 runs B\(c0,mb0\) \(action 1\) before its forward"):
        validate(two_stage([F(0), SF(0), F(1), SF(1), RB(0), B(0), RB(1), B(1), SYNC], stage1))


def test_catches_missing_microbatch():
    stage1 = [RF(0), F(0), B(0), SB(0), SYNC]
    with pytest.raises(ScheduleError, match="stage 1 never runs the forward of mb 1"):
        validate(two_stage([F(0), SF(0), F(1), SF(1), RB(0), B(0), RB(1), B(1), SYNC], stage1))


def test_catches_mismatched_ids():
    header = forward_only(2, 2).header
    nf = [Action(K.F_NOGRAD, 0), Action(K.F_NOGRAD, 1)]
    stage0 = [nf[0], nf[1], SF(1), SF(0)]  # sends mb 1 first
    stage1 = [RF(0), RF(1), nf[0], nf[1]]  # but expects mb 0 first
    with pytest.raises(ScheduleError, match=r"message #0: stage 0 sends SEND_F\(c0,mb1->s1c0\).*receives "
                                            r"RECV_F\(c0,mb0<-s0c0\).*mismatched"):
        validate(Schedule(header, {0: tuple(stage0), 1: tuple(stage1)}))


def test_catches_unmatched_send():
    header = forward_only(2, 1).header
    stage0 = [Action(K.F_NOGRAD, 0), SF(0)]
    with pytest.raises(ScheduleError, match="stage 1 never runs the forward of mb 0"):
        validate(Schedule(header, {0: tuple(stage0), 1: ()}))
    stage1 = [RF(0), Action(K.F_NOGRAD, 0), Action(K.SEND_F, 0, 0, 0, 0)]
    with pytest.raises(ScheduleError, match=r"stage 1 communication differs from the plan: unexpected "
                                            r"\['SEND_F\(c0,mb0->s0c0\)'\]"):
        validate(Schedule(header, {0: tuple(stage0), 1: tuple(stage1)}))


def test_catches_wrong_kind_duplicate_and_unplanned_work():
    ok0 = [F(0), SF(0), F(1), SF(1), RB(0), B(0), RB(1), B(1), SYNC]
    wrong = [F(0), SF(0), F(1), SF(1), RB(0), Action(K.B_TRUNC, 0), RB(1), B(1), SYNC]
    with pytest.raises(ScheduleError, match=r"stage 0 runs B_TRUNC\(c0,mb0\) but the plan needs B"):
        validate(two_stage(wrong))
    with pytest.raises(ScheduleError, match="more than once"):
        validate(two_stage(ok0[:5] + [F(1)] + ok0[5:]))
    header = forward_only(2, 1).header
    stage0 = (Action(K.F_NOGRAD, 0), SF(0), B(0))
    with pytest.raises(ScheduleError, match=r"stage 0 runs B\(c0,mb0\), which the plan does not include"):
        validate(Schedule(header, {0: stage0, 1: (RF(0), Action(K.F_NOGRAD, 0))}))


def test_catches_grad_sync_problems():
    no_sync = [F(0), SF(0), F(1), SF(1), RB(0), B(0), RB(1), B(1)]
    with pytest.raises(ScheduleError, match="GRAD_SYNC for chunks \\[\\] but trains chunks \\[0\\]"):
        validate(two_stage(no_sync))
    early = [F(0), SF(0), F(1), SF(1), RB(0), B(0), SYNC, RB(1), B(1)]
    with pytest.raises(ScheduleError, match="comes before the chunk's last backward"):
        validate(two_stage(early))


def test_catches_exit_seeded_backward_without_exit():
    routes = (Route(0, "warmup_fill", 0, (0,), final_loss=False),)
    header = ScheduleHeader("hand", 2, 1, 1, routes)
    s = Schedule(header, {0: (F(0), Action(K.B_EXIT, 0), SYNC), 1: ()})
    with pytest.raises(ScheduleError, match="stage 0 chunk 0, which holds no exit"):
        validate(s)
    validate(Schedule(ScheduleHeader("hand", 2, 1, 1, routes, (0,)), dict(s.actions)))


def test_route_and_header_checks():
    with pytest.raises(ScheduleError, match="chained backward must cover"):
        Route(0, "full", 3, (0, 1))
    with pytest.raises(ScheduleError, match="unknown role"):
        Route(0, "bogus", 1)
    with pytest.raises(ScheduleError, match="routes must be listed"):
        ScheduleHeader("x", 2, 1, 1, (Route(1, "full", 1, (0, 1)),))


def test_simulate_costs_latency_and_timeline():
    s = one_f_one_b(4, 4)
    base = simulate(s, Costs(forward=1, backward=2))
    slow = simulate(s, Costs(forward=1, backward=2, p2p=0.5))
    assert slow.makespan > base.makespan
    per_stage = simulate(s, Costs(forward=[1, 1, 3, 1], backward=2))
    assert per_stage.busy[2] == pytest.approx(4 * (3 + 2))
    assert per_stage.makespan > base.makespan
    spans = base.compute_spans(0)
    assert [sp.action.kind for sp in spans].count(K.B) == 4
    assert all(a.end <= b.start + 1e-12 for a, b in zip(spans, spans[1:]))
    assert sum(base.idle.values()) == pytest.approx(base.bubble_fraction * 4 * base.makespan)


def test_ascii_grid_draws_every_stage():
    s = one_f_one_b(2, 2)
    text = ascii_grid(simulate(s), s.header)
    lines = text.splitlines()
    assert lines[0].startswith("stage  0 F0|F1|") and lines[1].startswith("stage  1 ...F0|B0")
    assert "bubble fraction 0.333" in text
