"""The data a pipeline schedule is made of: action kinds, actions, the global plan, the schedule.

A schedule is a per-stage ordered list of :class:`Action` plus a :class:`ScheduleHeader` holding the
*global plan*: one :class:`Route` per microbatch id saying how far its forward goes and on which model
positions its backward runs. Generators derive every stage's list from that one plan, so all stages
pair the same data with the same id (EE-LLM's bubble filling did not).

Vocabulary
----------
* ``stage``: rank inside the pipeline group, ``0 .. pp-1``.
* ``chunk``: virtual-pipeline model chunk on a stage, ``0 .. vpp-1`` (always 0 without interleaving).
* ``position``: place of a (stage, chunk) on the forward path, ``chunk * pp + stage`` (Megatron's
  interleaved layer assignment); ``0 .. pp*vpp-1``. Exits live on positions.
* ``mb``: GLOBAL microbatch id: the same id is the same data on every stage. Ids ``0 .. m-1`` are the
  step's ordinary microbatches; bubble filling adds extra ids ``m ..`` (warm-up fills first, then
  cool-down fills, see ``ScheduleHeader.fill_warmup`` / ``fill_cooldown``), so the data loader must
  supply ``header.num_microbatches_total`` microbatches and losses are normalised by ``m``.

How a runtime executes a stage's list (literally, in order)
-----------------------------------------------------------
* ``RECV_F`` / ``RECV_B`` deposit the received tensor in a buffer keyed by ``(chunk, mb)``;
  ``F`` / ``B`` take their input from that buffer (first position: from the data). A receive can
  come several actions before its consumer: receives are posted in the sender's order per channel.
* ``SEND_F`` / ``SEND_B`` send the output / input-gradient of the compute action of the same
  ``(chunk, mb)`` that precedes them.
* **Batching rule**: every maximal run of consecutive communication actions (SEND_*/RECV_*) must be
  posted together as ONE ``batch_isend_irecv`` and all its requests waited on before the next
  non-communication action. E.g. 1F1B's steady state ``F, SEND_F + RECV_B, B, SEND_B + RECV_F``:
  issued one by one with blocking semantics, adjacent stages would both block in their sends.
  ``validate`` proves freedom from deadlock under exactly this rule with rendezvous (unbuffered) sends.
* Messages between a pair of stages match in order (first send with first receive), so one tag works;
  post a batch's operations in list order (with pp == 2 one batch can hold an activation and a
  gradient for the same peer, and both ends list them in the same order).

Compute kinds (see :class:`ActionKind`): ``F`` keeps the autograd graph for a later backward on this
stage; ``F_NOGRAD`` has no backward here. A forward that stops early (a warm-up fill's partial forward)
is simply an ``F`` with no ``SEND_F`` after it; its backward is ``B_EXIT``, seeded by the chunk's exit
losses only. ``B`` is seeded by the received gradient (or by the final loss at the last position) plus
the chunk's exit losses, in one autograd call. ``B_TRUNC`` is a ``B`` whose input gradient is not sent
upstream (a cool-down fill's truncated backward). ``GRAD_SYNC`` marks that all backward work of a chunk
on this stage is done: start its data-parallel gradient reduction.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum

__all__ = [
    "ActionKind",
    "Action",
    "Route",
    "ScheduleHeader",
    "Schedule",
    "ScheduleError",
    "COMPUTE_KINDS",
    "COMM_KINDS",
    "FORWARD_KINDS",
    "BACKWARD_KINDS",
    "needs_input_grad",
]


class ScheduleError(ValueError):
    """A schedule (or a request for one) that cannot run; the message says where and why."""


class ActionKind(Enum):
    F = "F"  # forward with autograd: a backward of this (chunk, mb) follows on this stage
    F_NOGRAD = "F_NOGRAD"  # forward without autograd: no backward of this (chunk, mb) here
    B = "B"  # backward seeded by received grad (or final loss at the last position) + exit losses
    B_EXIT = "B_EXIT"  # backward seeded by this chunk's exit losses only (forward stopped here)
    B_TRUNC = "B_TRUNC"  # like B, but the input gradient is not sent upstream (truncated)
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"
    GRAD_SYNC = "GRAD_SYNC"  # all backward of `chunk` on this stage done: reduce its grads over dp

    # Members are singletons: identity hashing is exact and much faster than Enum's name hashing,
    # which dominates validating and simulating large schedules.
    __hash__ = object.__hash__


FORWARD_KINDS = frozenset({ActionKind.F, ActionKind.F_NOGRAD})
BACKWARD_KINDS = frozenset({ActionKind.B, ActionKind.B_EXIT, ActionKind.B_TRUNC})
COMPUTE_KINDS = FORWARD_KINDS | BACKWARD_KINDS
COMM_KINDS = frozenset({ActionKind.SEND_F, ActionKind.RECV_F, ActionKind.SEND_B, ActionKind.RECV_B})


@dataclass(frozen=True, slots=True)
class Action:
    """One step of one stage.

    ``chunk`` and ``mb`` name the work this action belongs to on THIS stage. For communication,
    ``peer`` is the other stage and ``peer_chunk`` the chunk there that produced (RECV) or will consume
    (SEND) the tensor. ``GRAD_SYNC`` uses only ``chunk`` (``mb`` is -1).
    """

    kind: ActionKind
    mb: int
    chunk: int = 0
    peer: int | None = None
    peer_chunk: int | None = None

    @property
    def is_comm(self) -> bool:
        return self.kind in COMM_KINDS

    def __str__(self) -> str:
        if self.kind is ActionKind.GRAD_SYNC:
            return f"GRAD_SYNC(c{self.chunk})"
        arrow = f"->s{self.peer}c{self.peer_chunk}" if self.kind.name.startswith("SEND") else ""
        arrow = f"<-s{self.peer}c{self.peer_chunk}" if self.kind.name.startswith("RECV") else arrow
        return f"{self.kind.name}(c{self.chunk},mb{self.mb}{arrow})"


ROLES = ("full", "warmup_fill", "cooldown_fill", "tune", "eval")


@dataclass(frozen=True)
class Route:
    """What one microbatch does, globally.

    The forward runs on positions ``0 .. fwd_last``. A backward runs on each position in ``bwd``.
    When ``chained``, ``bwd`` is a contiguous range ending at ``fwd_last`` and each backward passes its
    input gradient to the position below it (unless that one is not in ``bwd``: truncation). Unchained
    backwards (EE-Tuning) are local: each exit position back-propagates its own exit losses only.
    ``final_loss``: the forward reaches the model's last position and its loss is the seed there.
    """

    mb: int
    role: str
    fwd_last: int
    bwd: tuple[int, ...] = ()
    chained: bool = True
    final_loss: bool = True

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ScheduleError(f"route of mb {self.mb}: unknown role {self.role!r}; use one of {ROLES}")
        if any(not 0 <= p <= self.fwd_last for p in self.bwd) or list(self.bwd) != sorted(set(self.bwd)):
            raise ScheduleError(
                f"route of mb {self.mb}: backward positions {self.bwd} must be ascending, unique and "
                f"within the forward 0..{self.fwd_last}"
            )
        if self.chained and self.bwd and list(self.bwd) != list(range(self.bwd[0], self.fwd_last + 1)):
            raise ScheduleError(
                f"route of mb {self.mb}: a chained backward must cover {self.bwd[0]}..{self.fwd_last}"
            )

    def receives_grad(self, pos: int) -> bool:
        return self.chained and pos in self.bwd and pos < self.fwd_last

    def sends_grad(self, pos: int) -> bool:
        return self.chained and pos in self.bwd and pos - 1 in self.bwd

    def forward_kind(self, pos: int) -> ActionKind:
        return ActionKind.F if pos in self.bwd else ActionKind.F_NOGRAD

    def backward_kind(self, pos: int, last_pos: int) -> ActionKind:
        seeded = self.receives_grad(pos) or (self.final_loss and pos == self.fwd_last == last_pos)
        if not seeded:
            return ActionKind.B_EXIT
        return ActionKind.B if pos == 0 or self.sends_grad(pos) else ActionKind.B_TRUNC


@dataclass(frozen=True)
class ScheduleHeader:
    """Shape of the step plus the global plan (``routes``, one per microbatch id ``0 .. n-1``)."""

    name: str
    pp: int
    vpp: int
    num_microbatches: int
    routes: tuple[Route, ...]
    exit_positions: tuple[int, ...] = ()
    backward_forward_ratio: float | None = None
    # The backward messages (SEND_B / RECV_B) carry the final head's targets for the exits instead of
    # activation gradients (EE-Tuning with a teacher, see ``ee_tuning_with_teacher``): a B runs the chunk's
    # deferred exit losses on the received targets and passes the same targets upstream.
    carries_targets: bool = False

    def __post_init__(self) -> None:
        if [r.mb for r in self.routes] != list(range(len(self.routes))):
            raise ScheduleError(f"{self.name}: routes must be listed for mb ids 0..{len(self.routes) - 1}")
        bad = [p for p in self.exit_positions if not 0 <= p < self.num_positions]
        if bad:
            raise ScheduleError(f"{self.name}: exit positions {bad} outside 0..{self.num_positions - 1}")

    @property
    def num_positions(self) -> int:
        return self.pp * self.vpp

    @property
    def num_microbatches_total(self) -> int:
        """Microbatches the data loader must supply: ordinary ones plus fill microbatches."""
        return len(self.routes)

    @property
    def exit_stages(self) -> tuple[int, ...]:
        return tuple(sorted({self.locate(p)[0] for p in self.exit_positions}))

    @property
    def fill_warmup(self) -> tuple[tuple[int, int], ...]:
        """(mb id, deepest stage of its partial forward) per warm-up fill microbatch."""
        return tuple((r.mb, self.locate(r.fwd_last)[0]) for r in self.routes if r.role == "warmup_fill")

    @property
    def fill_cooldown(self) -> tuple[tuple[int, int], ...]:
        """(mb id, first stage running its truncated backward) per cool-down fill microbatch."""
        return tuple((r.mb, self.locate(r.bwd[0])[0]) for r in self.routes if r.role == "cooldown_fill")

    def position(self, stage: int, chunk: int) -> int:
        return chunk * self.pp + stage

    def locate(self, position: int) -> tuple[int, int]:
        """(stage, chunk) of a position."""
        return position % self.pp, position // self.pp


@dataclass(frozen=True, eq=False)
class Schedule(Mapping):
    """``stage -> tuple[Action, ...]`` (a read-only mapping) plus the :class:`ScheduleHeader`."""

    header: ScheduleHeader
    actions: Mapping[int, tuple[Action, ...]] = field(default_factory=dict)

    def __getitem__(self, stage: int) -> tuple[Action, ...]:
        return self.actions[stage]

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self.actions))

    def __len__(self) -> int:
        return len(self.actions)


def needs_input_grad(schedule: Schedule, stage: int) -> frozenset[tuple[int, int]]:
    """(chunk, mb) pairs whose forward input on ``stage`` needs ``requires_grad``: those followed by a
    SEND_B. A runtime reads this once per step instead of looking ahead in the action list."""
    return frozenset((a.chunk, a.mb) for a in schedule[stage] if a.kind is ActionKind.SEND_B)
