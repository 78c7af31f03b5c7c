"""``simulate(schedule, costs)``: makespan, per-stage busy/idle time, bubble fraction and a timeline.

Definitions (Megatron's paper, Narayanan et al. 2021): a stage is *busy* while it computes (forward,
backward, exit heads, gradient-sync launch) and *idle* otherwise, including time spent waiting on
communication. ``makespan`` is the time the last stage finishes (every stage starts at 0).
``bubble_fraction = sum(idle) / (pp * makespan)``: the idle share of all stage-time. For 1F1B with
uniform stages and free p2p it is ``(pp - 1) / (m + pp - 1)`` whatever the forward/backward ratio.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .actions import BACKWARD_KINDS, FORWARD_KINDS, Action, ActionKind, Schedule, ScheduleHeader
from .engine import Span, run_timeline

__all__ = ["Costs", "SimResult", "simulate"]

CostSpec = float | Sequence[float] | Mapping[tuple[int, int], float]


def _lookup(spec: CostSpec, stage: int, chunk: int) -> float:
    if isinstance(spec, Mapping):
        return float(spec[(stage, chunk)])
    if isinstance(spec, Sequence):
        return float(spec[stage])
    return float(spec)


@dataclass(frozen=True)
class Costs:
    """Durations. ``forward``/``backward`` are the backbone costs of one microbatch on one
    (stage, chunk): a number, a per-stage sequence, or a ``{(stage, chunk): cost}`` mapping.
    ``exit_forward``/``exit_backward`` are added per exit head on the position (any compute that runs
    the heads: every forward and backward at an exit position). ``p2p`` is the latency of one message,
    ``grad_sync`` the cost of launching one chunk's gradient reduction."""

    forward: CostSpec = 1.0
    backward: CostSpec = 2.0
    exit_forward: CostSpec = 0.0
    exit_backward: CostSpec = 0.0
    p2p: float = 0.0
    grad_sync: float = 0.0

    @classmethod
    def from_ratio(cls, backward_forward_ratio: float, **kw) -> "Costs":
        """Unit forward, backward = ``backward_forward_ratio`` (``--backward-forward-ratio``)."""
        return cls(forward=1.0, backward=float(backward_forward_ratio), **kw)

    def duration(self, header: ScheduleHeader, stage: int, action: Action) -> float:
        if action.kind is ActionKind.GRAD_SYNC:
            return self.grad_sync
        if action.is_comm:
            return 0.0
        heads = header.exit_positions.count(header.position(stage, action.chunk))
        if action.kind in FORWARD_KINDS:
            return _lookup(self.forward, stage, action.chunk) + heads * _lookup(self.exit_forward, stage, action.chunk)
        assert action.kind in BACKWARD_KINDS
        return _lookup(self.backward, stage, action.chunk) + heads * _lookup(self.exit_backward, stage, action.chunk)


@dataclass(frozen=True)
class SimResult:
    makespan: float
    busy: dict[int, float]
    idle: dict[int, float]
    bubble_fraction: float
    timeline: dict[int, list[Span]]  # every action, in order; comm spans run from post to completion

    def compute_spans(self, stage: int) -> list[Span]:
        """The spans that occupy the stage (compute and gradient-sync launch), for drawing."""
        return [sp for sp in self.timeline[stage] if not sp.action.is_comm]


def simulate(schedule: Schedule, costs: Costs | None = None) -> SimResult:
    """Time the schedule under ``costs`` (default: forward 1, backward 2, free p2p)."""
    costs = costs or Costs()
    h = schedule.header
    cache: dict[tuple[int, ActionKind, int], float] = {}

    def duration(stage: int, a: Action) -> float:
        key = (stage, a.kind, a.chunk)
        if key not in cache:
            cache[key] = costs.duration(h, stage, a)
        return cache[key]

    timeline = run_timeline(schedule, duration, costs.p2p)
    makespan = max((sp.end for spans in timeline.values() for sp in spans), default=0.0)
    busy = {s: sum(sp.end - sp.start for sp in spans if not sp.action.is_comm) for s, spans in timeline.items()}
    idle = {s: makespan - b for s, b in busy.items()}
    total = makespan * len(timeline)
    bubble = sum(idle.values()) / total if total else 0.0
    return SimResult(makespan, busy, idle, bubble, timeline)
