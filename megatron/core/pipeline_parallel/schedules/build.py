"""Turning per-stage compute orders into complete schedules: the communication is derived, not written.

Generators only decide, for each stage, the ORDER of its compute actions (F/F_NOGRAD/B/B_EXIT/B_TRUNC);
the kind of each one and every SEND/RECV follow from the header's global plan (:class:`Route`):

* a send comes right after the compute action that produced the tensor;
* receives are posted in the sender's order on each (src, dst) channel, each one no later than just
  before its consumer (earlier ones are buffered), so both ends of a channel agree on message order;
* the sends of one compute action and the receives of the next one are adjacent, hence form one
  batch under the batching rule (see ``actions.py``);
* ``GRAD_SYNC(chunk)`` follows the communication run after the chunk's last backward on the stage.

A generator whose batches must line up across stages in a designed way (Megatron's interleaved 1F1B)
puts explicit :class:`Exchange` points in a stage's order instead; the sends then happen only there
and each exchange receives the next messages, in channel order, from the neighbours it names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .actions import (
    BACKWARD_KINDS,
    FORWARD_KINDS,
    Action,
    ActionKind,
    Schedule,
    ScheduleError,
    ScheduleHeader,
)

__all__ = ["assemble", "Exchange", "forward", "backward", "expected_sends", "expected_recv"]


def forward(header: ScheduleHeader, stage: int, mb: int, chunk: int = 0) -> Action:
    """The forward compute action of ``mb`` on (stage, chunk), its kind taken from the plan."""
    pos = header.position(stage, chunk)
    return Action(header.routes[mb].forward_kind(pos), mb, chunk)


def backward(header: ScheduleHeader, stage: int, mb: int, chunk: int = 0) -> Action:
    """The backward compute action of ``mb`` on (stage, chunk), its kind taken from the plan."""
    pos = header.position(stage, chunk)
    return Action(header.routes[mb].backward_kind(pos, header.num_positions - 1), mb, chunk)


def expected_sends(header: ScheduleHeader, stage: int, act: Action) -> list[Action]:
    """The SEND that must follow compute action ``act`` on ``stage`` (empty list if none)."""
    pos = header.position(stage, act.chunk)
    route = header.routes[act.mb]
    if act.kind in FORWARD_KINDS and pos < route.fwd_last:
        dst, dchunk = header.locate(pos + 1)
        return [Action(ActionKind.SEND_F, act.mb, act.chunk, dst, dchunk)]
    if act.kind in BACKWARD_KINDS and route.sends_grad(pos):
        dst, dchunk = header.locate(pos - 1)
        return [Action(ActionKind.SEND_B, act.mb, act.chunk, dst, dchunk)]
    return []


def expected_recv(header: ScheduleHeader, stage: int, act: Action) -> Action | None:
    """The RECV whose tensor compute action ``act`` on ``stage`` consumes, or None."""
    pos = header.position(stage, act.chunk)
    route = header.routes[act.mb]
    if act.kind in FORWARD_KINDS and pos > 0:
        src, schunk = header.locate(pos - 1)
        return Action(ActionKind.RECV_F, act.mb, act.chunk, src, schunk)
    if act.kind in BACKWARD_KINDS and route.receives_grad(pos):
        src, schunk = header.locate(pos + 1)
        return Action(ActionKind.RECV_B, act.mb, act.chunk, src, schunk)
    return None


def _matching_recv(send: Action, stage: int) -> Action:
    kind = ActionKind.RECV_F if send.kind is ActionKind.SEND_F else ActionKind.RECV_B
    return Action(kind, send.mb, send.peer_chunk, stage, send.chunk)


@dataclass(frozen=True)
class Exchange:
    """An explicit communication point in a stage's order (for schedules whose batches are designed
    in lockstep across stages, like Megatron's interleaved 1F1B): the sends produced by ``send_of``,
    then the next ``recv_prev`` messages from stage-1 and ``recv_next`` from stage+1, one batch."""

    send_of: tuple[Action, ...] = ()
    recv_prev: int = 0
    recv_next: int = 0


Item = Action | Exchange


def _sends(header: ScheduleHeader, stage: int, items: Sequence[Item]) -> list[Action]:
    """Sends in the order the stage issues them: at Exchanges if it has any, else after each compute."""
    explicit = any(isinstance(it, Exchange) for it in items)
    out: list[Action] = []
    for it in items:
        if isinstance(it, Exchange):
            out += [s for a in it.send_of for s in expected_sends(header, stage, a)]
        elif not explicit:
            out += expected_sends(header, stage, it)
    return out


class _Channels:
    """Messages per (src, dst) in send order, and how many each receiver has posted so far."""

    def __init__(self, header: ScheduleHeader, items: Mapping[int, Sequence[Item]]):
        self.name = header.name
        self.msgs: dict[tuple[int, int], list[Action]] = {}
        for stage in range(header.pp):
            for send in _sends(header, stage, items.get(stage, ())):
                self.msgs.setdefault((stage, send.peer), []).append(_matching_recv(send, stage))
        self.where = {(dst, r): i for (src, dst), msgs in self.msgs.items() for i, r in enumerate(msgs)}
        self.posted = dict.fromkeys(self.msgs, 0)

    def upto(self, stage: int, recv: Action) -> list[Action]:
        """Receives to post on ``stage`` so that ``recv`` is among them (channel order kept)."""
        ch = (recv.peer, stage)
        if (stage, recv) not in self.where:
            raise ScheduleError(f"{self.name}: stage {stage} needs {recv} but no stage sends it")
        return self.take(ch, self.where[(stage, recv)] + 1 - self.posted[ch])

    def take(self, ch: tuple[int, int], n: int) -> list[Action]:
        start = self.posted[ch]
        if start + n > len(self.msgs.get(ch, ())):
            raise ScheduleError(f"{self.name}: stage {ch[1]} receives more messages from stage {ch[0]} than it sends")
        self.posted[ch] = start + max(n, 0)
        return self.msgs[ch][start : start + n] if n > 0 else []

    def check_drained(self) -> None:
        unread = {ch: len(m) - self.posted[ch] for ch, m in self.msgs.items() if self.posted[ch] < len(m)}
        if unread:
            raise ScheduleError(f"{self.name}: messages sent but never received on channels {unread}")


def assemble(header: ScheduleHeader, items: Mapping[int, Sequence[Item]]) -> Schedule:
    """Complete per-stage orders of compute actions (and optional :class:`Exchange` points) into a
    schedule with every send, receive and GRAD_SYNC (see the module docstring)."""
    channels = _Channels(header, items)
    pp = header.pp
    out = {}
    for stage in range(pp):
        order = list(items.get(stage, ()))
        explicit = any(isinstance(it, Exchange) for it in order)
        last_bwd = {it.chunk: i for i, it in enumerate(order) if isinstance(it, Action) and it.kind in BACKWARD_KINDS}
        actions: list[Action] = []
        pending_sync: list[int] = []
        for i, it in enumerate(order):
            if isinstance(it, Exchange):
                actions += [s for a in it.send_of for s in expected_sends(header, stage, a)]
                actions += channels.take(((stage - 1) % pp, stage), it.recv_prev)
                actions += channels.take(((stage + 1) % pp, stage), it.recv_next)
            else:
                recv = None if explicit else expected_recv(header, stage, it)
                if recv is not None:
                    actions += channels.upto(stage, recv)
                actions += [Action(ActionKind.GRAD_SYNC, -1, c) for c in pending_sync]
                pending_sync.clear()
                actions.append(it)
                actions += [] if explicit else expected_sends(header, stage, it)
            pending_sync += [c for c, j in last_bwd.items() if j == i]
        actions += [Action(ActionKind.GRAD_SYNC, -1, c) for c in pending_sync]
        out[stage] = tuple(actions)
    channels.check_drained()
    return Schedule(header, out)
