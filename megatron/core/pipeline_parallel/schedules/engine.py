"""Executing a schedule on paper: message pairing and a timed run that detects deadlock.

Model (the one the runtime must honour, see ``actions.py``): each stage runs its actions in order; a
compute action takes its duration; each maximal run of communication actions is one batch, posted at
once and finished when every message in it is finished. Sends are rendezvous (unbuffered): a message
finishes ``p2p`` after both its send and its receive are posted. Messages on a (src, dst) channel pair
in order. Both ``validate`` and ``simulate`` use this one engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .actions import Action, ActionKind, Schedule, ScheduleError

__all__ = ["Span", "pair_messages", "run_timeline"]

_RECV_OF = {ActionKind.SEND_F: ActionKind.RECV_F, ActionKind.SEND_B: ActionKind.RECV_B}


@dataclass(frozen=True, slots=True)
class Span:
    """When an action ran on a stage; communication spans run from posting to completion."""

    start: float
    end: float
    action: Action


def pair_messages(schedule: Schedule) -> dict[tuple[int, int], tuple[int, int]]:
    """Pair every send with its receive: ``(stage, index) -> (peer stage, peer index)`` both ways.

    Raises ScheduleError on a send or receive without partner, or a pair whose kinds, microbatch ids
    or chunks disagree (the receiver would put the tensor in the wrong place)."""
    sends: dict[tuple[int, int], list[int]] = {}
    recvs: dict[tuple[int, int], list[int]] = {}
    for stage in schedule:
        for i, a in enumerate(schedule[stage]):
            if a.kind in _RECV_OF:
                sends.setdefault((stage, a.peer), []).append(i)
            elif a.is_comm:
                recvs.setdefault((a.peer, stage), []).append(i)
    pairs = {}
    for ch in sorted(set(sends) | set(recvs)):
        src, dst = ch
        s_idx, r_idx = sends.get(ch, []), recvs.get(ch, [])
        if len(s_idx) != len(r_idx):
            raise ScheduleError(
                f"channel stage {src} -> stage {dst}: {len(s_idx)} sends but {len(r_idx)} receives "
                f"(first unmatched: {_first_unmatched(schedule, ch, s_idx, r_idx)})"
            )
        for n, (i, j) in enumerate(zip(s_idx, r_idx)):
            send, recv = schedule[src][i], schedule[dst][j]
            if (_RECV_OF[send.kind], send.mb, send.chunk, send.peer_chunk) != (
                recv.kind, recv.mb, recv.peer_chunk, recv.chunk
            ):
                raise ScheduleError(
                    f"channel stage {src} -> stage {dst}, message #{n}: stage {src} sends {send} "
                    f"(action {i}) but stage {dst} receives {recv} (action {j}); mismatched "
                    f"kind/microbatch/chunk"
                )
            pairs[(src, i)] = (dst, j)
            pairs[(dst, j)] = (src, i)
    return pairs


def _first_unmatched(schedule: Schedule, ch: tuple[int, int], s_idx: list[int], r_idx: list[int]) -> str:
    src, dst = ch
    n = min(len(s_idx), len(r_idx))
    if len(s_idx) > n:
        return f"stage {src} {schedule[src][s_idx[n]]}"
    return f"stage {dst} {schedule[dst][r_idx[n]]}"


def _steps(actions: tuple[Action, ...]) -> list[list[int]]:
    """Indices grouped into steps: one per non-communication action, one per communication run."""
    steps: list[list[int]] = []
    for i, a in enumerate(actions):
        if a.is_comm and steps and actions[steps[-1][0]].is_comm:
            steps[-1].append(i)
        else:
            steps.append([i])
    return steps


def run_timeline(
    schedule: Schedule, duration: Callable[[int, Action], float], p2p: float = 0.0
) -> dict[int, list[Span]]:
    """Run the schedule under the engine's model; per-stage spans in execution order.

    Raises ScheduleError naming every blocked stage, its pending batch and what the peer is doing,
    when no stage can make progress before all are done (a deadlock)."""
    pairs = pair_messages(schedule)
    steps = {s: _steps(schedule[s]) for s in schedule}
    step_of = {(s, i): k for s in steps for k, step in enumerate(steps[s]) for i in step}
    # Per step: its actions and, for a communication batch, the peers' (stage, step) it waits on.
    plan = {
        s: [([schedule[s][i] for i in step],
             [(pairs[(s, i)][0], step_of[pairs[(s, i)]]) for i in step] if schedule[s][step[0]].is_comm else None)
            for step in steps[s]]
        for s in schedule
    }
    pos = dict.fromkeys(schedule, 0)
    clock = dict.fromkeys(schedule, 0.0)
    post_time: dict[tuple[int, int], float] = {}
    spans: dict[int, list[Span]] = {s: [] for s in schedule}
    progress = True
    while progress:
        progress = False
        for s in schedule:
            mine, k, t = plan[s], pos[s], clock[s]
            while k < len(mine):
                acts, waits_on = mine[k]
                if waits_on is None:
                    end = t + duration(s, acts[0])
                    spans[s].append(Span(t, end, acts[0]))
                else:
                    start = post_time.setdefault((s, k), t)
                    peer_posts = [post_time.get(key) for key in waits_on]
                    if None in peer_posts:
                        break
                    end = max(max(start, pt) + p2p for pt in peer_posts)
                    spans[s].extend(Span(start, end, a) for a in acts)
                t = end
                k += 1
                progress = True
            pos[s], clock[s] = k, t
    blocked = [s for s in schedule if pos[s] < len(steps[s])]
    if blocked:
        raise ScheduleError("deadlock: " + "; ".join(_describe_block(schedule, steps, pos, pairs, s)
                                                      for s in blocked))
    return spans


def _describe_block(schedule, steps, pos, pairs, stage) -> str:
    waiting = []
    for i in steps[stage][pos[stage]]:
        ps, pi = pairs[(stage, i)]
        if pos[ps] >= len(steps[ps]) or pi not in steps[ps][pos[ps]]:
            now = schedule[ps][steps[ps][pos[ps]][0]] if pos[ps] < len(steps[ps]) else "its end"
            waiting.append(f"{schedule[stage][i]} waits for stage {ps} (which is at {now})")
    pending = ", ".join(str(schedule[stage][i]) for i in steps[stage][pos[stage]])
    return f"stage {stage} blocked in batch [{pending}]" + (": " + ", ".join(waiting) if waiting else "")
