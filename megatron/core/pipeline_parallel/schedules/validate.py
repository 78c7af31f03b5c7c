"""``validate(schedule)``: prove a schedule is executable and does exactly the planned work.

Checks, in order, each failing with a :class:`ScheduleError` that names the stage, action and reason:

1. fields: stages ``0..pp-1``, chunks ``0..vpp-1``, microbatch ids of the plan, peers adjacent stages;
2. work: every (stage, chunk, microbatch) compute action the plan (``header.routes``) asks for appears
   exactly once with the planned kind, and nothing else; exit-seeded backwards only on exit positions;
3. order on each stage: F before its backward, each receive before the compute that consumes it, each
   send after the compute that produced it, one GRAD_SYNC per trained chunk after its last backward;
4. communication: the sends and receives are exactly the planned ones, every send is paired with a
   receive carrying the same microbatch id and chunk (in order per channel), and the timed run of
   ``engine.run_timeline`` (batched runs, rendezvous sends) finishes: no deadlock.
"""

from __future__ import annotations

from collections import Counter

from .actions import BACKWARD_KINDS, COMPUTE_KINDS, FORWARD_KINDS, Action, ActionKind, Schedule, ScheduleError
from .build import backward, expected_recv, expected_sends, forward
from .engine import run_timeline

__all__ = ["validate"]


def validate(schedule: Schedule) -> None:
    h = schedule.header
    if sorted(schedule) != list(range(h.pp)):
        raise ScheduleError(f"{h.name}: stages {sorted(schedule)} but the header says pp={h.pp}")
    for stage in schedule:
        for i, a in enumerate(schedule[stage]):
            _check_fields(schedule, stage, i, a)
    _check_work(schedule)
    for stage in schedule:
        _check_order(schedule, stage)
    run_timeline(schedule, lambda s, a: 1.0 if a.kind in COMPUTE_KINDS else 0.0)


def _check_fields(schedule: Schedule, stage: int, i: int, a: Action) -> None:
    h = schedule.header
    where = f"{h.name}: stage {stage} action {i} {a}"
    if not 0 <= a.chunk < h.vpp:
        raise ScheduleError(f"{where}: chunk outside 0..{h.vpp - 1}")
    if a.kind is not ActionKind.GRAD_SYNC and not 0 <= a.mb < len(h.routes):
        raise ScheduleError(f"{where}: microbatch id not in the plan (0..{len(h.routes) - 1})")
    if a.is_comm:
        if a.peer not in ((stage + 1) % h.pp, (stage - 1) % h.pp) or a.peer == stage:
            raise ScheduleError(f"{where}: peer must be an adjacent stage")
        if a.peer_chunk is None or not 0 <= a.peer_chunk < h.vpp:
            raise ScheduleError(f"{where}: peer chunk outside 0..{h.vpp - 1}")


def _planned_compute(schedule: Schedule) -> dict[tuple[int, int, int, str], ActionKind]:
    h = schedule.header
    plan = {}
    for route in h.routes:
        for pos in range(route.fwd_last + 1):
            stage, chunk = h.locate(pos)
            plan[(stage, chunk, route.mb, "forward")] = forward(h, stage, route.mb, chunk).kind
        for pos in route.bwd:
            stage, chunk = h.locate(pos)
            kind = backward(h, stage, route.mb, chunk).kind
            if kind is ActionKind.B_EXIT and pos not in h.exit_positions:
                raise ScheduleError(
                    f"{h.name}: the plan seeds mb {route.mb}'s backward with exit losses at stage {stage} "
                    f"chunk {chunk}, which holds no exit"
                )
            plan[(stage, chunk, route.mb, "backward")] = kind
    return plan


def _check_work(schedule: Schedule) -> None:
    h = schedule.header
    plan = _planned_compute(schedule)
    seen: Counter = Counter()
    for stage in schedule:
        for a in schedule[stage]:
            if a.kind not in COMPUTE_KINDS:
                continue
            key = (stage, a.chunk, a.mb, "forward" if a.kind in FORWARD_KINDS else "backward")
            seen[key] += 1
            if key not in plan:
                raise ScheduleError(f"{h.name}: stage {stage} runs {a}, which the plan does not include")
            if plan[key] is not a.kind:
                raise ScheduleError(f"{h.name}: stage {stage} runs {a} but the plan needs {plan[key].name} there")
            if seen[key] > 1:
                raise ScheduleError(f"{h.name}: stage {stage} runs {a} more than once")
    # Report the earliest missing work first: lowest stage, then microbatch, forward before backward.
    missing = sorted((k for k in plan if not seen[k]), key=lambda k: (k[0], k[2], k[1], k[3] != "forward"))
    if missing:
        stage, chunk, mb, what = missing[0]
        raise ScheduleError(
            f"{h.name}: stage {stage} never runs the {what} of mb {mb} (chunk {chunk}); "
            f"{len(missing)} planned compute action(s) missing"
        )


def _check_order(schedule: Schedule, stage: int) -> None:
    h = schedule.header
    actions = schedule[stage]
    index = {a: i for i, a in enumerate(actions)}
    planned_comm: Counter = Counter()
    for i, a in enumerate(actions):
        if a.kind not in COMPUTE_KINDS:
            continue
        if a.kind in BACKWARD_KINDS:
            fwd = forward(h, stage, a.mb, a.chunk)
            if index.get(fwd, len(actions)) > i:
                raise ScheduleError(f"{h.name}: stage {stage} runs {a} (action {i}) before its forward {fwd}")
        recv = expected_recv(h, stage, a)
        if recv is not None:
            planned_comm[recv] += 1
            if index.get(recv, len(actions)) > i:
                raise ScheduleError(f"{h.name}: stage {stage} runs {a} (action {i}) before receiving {recv}")
        for send in expected_sends(h, stage, a):
            planned_comm[send] += 1
            if index.get(send, -1) < i:
                raise ScheduleError(f"{h.name}: stage {stage} must send {send} after {a} (action {i})")
    actual_comm = Counter(a for a in actions if a.is_comm)
    if actual_comm != planned_comm:
        extra = sorted(map(str, (actual_comm - planned_comm).elements()))
        lacking = sorted(map(str, (planned_comm - actual_comm).elements()))
        raise ScheduleError(
            f"{h.name}: stage {stage} communication differs from the plan: unexpected {extra}, missing {lacking}"
        )
    _check_grad_sync(schedule, stage)


def _check_grad_sync(schedule: Schedule, stage: int) -> None:
    h = schedule.header
    actions = schedule[stage]
    last_bwd = {a.chunk: i for i, a in enumerate(actions) if a.kind in BACKWARD_KINDS}
    syncs = [(i, a.chunk) for i, a in enumerate(actions) if a.kind is ActionKind.GRAD_SYNC]
    chunks = [c for _, c in syncs]
    if sorted(chunks) != sorted(last_bwd):
        raise ScheduleError(
            f"{h.name}: stage {stage} has GRAD_SYNC for chunks {sorted(chunks)} but trains chunks "
            f"{sorted(last_bwd)}; each trained chunk needs exactly one"
        )
    for i, c in syncs:
        if i < last_bwd[c]:
            raise ScheduleError(
                f"{h.name}: stage {stage} GRAD_SYNC(c{c}) at action {i} comes before the chunk's last "
                f"backward (action {last_bwd[c]})"
            )
