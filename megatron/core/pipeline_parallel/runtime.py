"""The one interpreter of pipeline schedules.

``run_schedule`` executes this stage's action list of a :class:`~.schedules.Schedule` literally, in
order (the rules are in ``schedules/actions.py``): consecutive communication actions are posted as one
batch; ``F`` runs the chunk's forward step; ``B`` / ``B_EXIT`` / ``B_TRUNC`` run :func:`backward_step`
with the chunk's weighted exit losses and, where the plan chains it, the received gradient;
``GRAD_SYNC`` starts the chunk's data-parallel gradient reduction.

The runtime knows nothing about models or data. The caller passes ``forward_step(chunk, mb, input)``
returning an object with ``output`` (the hidden state for the next position, or on the model's last
position the microbatch's scalar final loss, already a masked token mean) and ``exit_losses``
(``{layer: scalar masked-mean exit loss}``). The runtime weights and normalises: every loss is divided
by the number of ordinary microbatches ``m`` (Megatron's convention; bubble filling's fill microbatches
are read in addition to the ``m`` and divided by ``m`` too, see ``schedules/filling.py`` for the
resulting objective and how it differs from EE-LLM's), exit losses are multiplied by their weight, and
the loss scale is applied in ``backward_step``.

A step output may also carry ``metrics`` (``{key: scalar}``, logged only), ``aux_loss`` (a scalar already
weighted, e.g. the exit estimators' loss: normalised by ``m`` and back-propagated with the exit losses) and
``deferred`` (see :class:`StepOutput`). Schedules whose backward messages carry targets
(``ScheduleHeader.carries_targets``): the last position's ``output`` is the targets message (a tuple of
tensors, shaped as ``targets_spec``); each ``B`` takes the targets (received, or its own at the last
position), runs the forward's ``deferred(targets)`` for its exit losses, back-propagates them and sends the
same targets upstream. A step run under ``torch.no_grad`` (evaluation) builds no graph at all and its
backwards only compute the losses.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

import torch

from .backward import backward_step, free_output, saving_aliases
from .p2p import PipelineP2P
from .schedules import (
    BACKWARD_KINDS,
    Action,
    ActionKind,
    Costs,
    Schedule,
    ScheduleError,
    ascii_grid,
    needs_input_grad,
    simulate,
)

__all__ = ["run_schedule", "StepLosses", "StepOutput", "ForwardStep", "PipelineStepError"]

_SENDS = frozenset({ActionKind.SEND_F, ActionKind.SEND_B})


class _StageOutput(Protocol):
    output: torch.Tensor
    exit_losses: Mapping[int, torch.Tensor]


ForwardStep = Callable[[int, int, "torch.Tensor | None"], _StageOutput]
Message = tuple[torch.Tensor, ...]


@dataclass
class StepOutput:
    """What a forward step returns (other objects with ``output`` and ``exit_losses`` work too).

    ``deferred(targets) -> StepOutput``: the exit losses (and metrics, aux loss) of this forward, computed
    when the targets message reaches this stage in a ``carries_targets`` schedule; its ``output`` is unused."""

    output: torch.Tensor | Message | None
    exit_losses: Mapping[int, torch.Tensor] = field(default_factory=dict)
    metrics: Mapping[str, torch.Tensor] = field(default_factory=dict)
    aux_loss: torch.Tensor | None = None
    deferred: Callable[[Message], "StepOutput"] | None = None


@dataclass
class StepLosses:
    """Unweighted loss values this rank computed in one step, summed over microbatches, with counts:
    ``"lm loss"`` (final exit) and ``"early loss [L]"`` per exit layer. ``mean()`` averages them.

    The sums stay on the losses' device (float64): reading a loss on the host per microbatch would stall
    the GPU's queue ``m x (exits + 1)`` times a step; ``mean()`` makes the step's one transfer."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, key: str, value: torch.Tensor) -> None:
        v = value.detach().to(torch.float64)
        self.sums[key] = self.sums[key] + v if key in self.sums else v
        self.counts[key] += 1

    def mean(self) -> dict[str, float]:
        keys = sorted(self.sums)
        if not keys:
            return {}
        totals = torch.stack([self.sums[k].reshape(()) for k in keys]).tolist()
        return {k: total / self.counts[k] for k, total in zip(keys, totals)}


@dataclass
class _Pending:
    """What a forward leaves for its backward."""

    input: torch.Tensor | None
    output: torch.Tensor | Message | None
    exit_loss: torch.Tensor | None
    deferred: Callable[[Message], StepOutput] | None = None


def run_schedule(
    schedule: Schedule,
    stage: int,
    forward_step: ForwardStep,
    *,
    comm: PipelineP2P | None,
    tensor_shape: Sequence[int],
    dtype: torch.dtype,
    exit_weights: Mapping[int, float] | None = None,
    loss_scale: float | torch.Tensor | None = None,
    grad_buffers: Sequence | None = None,
    deallocate_outputs: bool = True,
    targets_spec: Sequence[tuple[Sequence[int], torch.dtype]] | None = None,
) -> StepLosses:
    """Run ``stage``'s actions of ``schedule``.

    Args:
        forward_step: ``(chunk, mb, input_or_None) -> object with .output and .exit_losses``.
        comm: the pipeline's p2p (``None`` only when the schedule has no communication).
        tensor_shape / dtype: of the activations exchanged between positions (``[s, b, h]``, with
            ``s`` divided by tp under sequence parallelism); gradients have the same shape.
        exit_weights: ``{layer: weight}`` at this iteration (a missing layer has weight 1).
        loss_scale: multiplies every loss before backward (fp16 dynamic loss scaling).
        grad_buffers: per chunk, a :class:`~megatron.core.distributed.grad_buffer.GradBuffers` (or
            ``None``): synchronisation is enabled before each chunk's last backward so buckets reduce
            while the backward goes on; the caller calls ``finish_grad_sync`` after the step.
        deallocate_outputs: free an output's data once it is sent, keeping its graph for the backward
            (Megatron's ``deallocate_pipeline_outputs``; see ``backward.py``). Off only to measure it.
        targets_spec: ``(shape, dtype)`` of each tensor of a targets message (``carries_targets`` schedules).

    A failure in any action is re-raised as :class:`PipelineStepError` naming the stage, the action and
    its index, with the schedule's timeline (the original exception is its ``__cause__``).
    """
    if schedule.header.carries_targets and not targets_spec and any(
            a.kind is ActionKind.RECV_B for a in schedule[stage]):
        raise ValueError(f"schedule {schedule.header.name!r} sends targets backward: give targets_spec")
    run = _StageRun(schedule, stage, forward_step, comm, tuple(tensor_shape), dtype, dict(exit_weights or {}),
                    loss_scale, grad_buffers, deallocate_outputs, targets_spec)
    actions = run.actions
    i = 0
    while i < len(actions):
        j = i + 1
        if actions[i].is_comm:
            while j < len(actions) and actions[j].is_comm:
                j += 1
        try:
            run.execute(i, actions[i:j])
        except Exception as e:
            raise PipelineStepError(schedule, stage, i, j, e) from e
        i = j
    if run.pending and any(a.kind in BACKWARD_KINDS for a in actions):
        leftover = sorted(run.pending)
        raise PipelineStepError(schedule, stage, len(actions), len(actions),
                                RuntimeError(f"forwards {leftover} were never back-propagated"))
    return run.losses


class _StageRun:
    """One stage's state while it runs its actions: received tensors, tensors to send, and what each
    forward leaves for its backward."""

    def __init__(self, schedule, stage, forward_step, comm, tensor_shape, dtype, weights, loss_scale,
                 grad_buffers, deallocate_outputs, targets_spec=None):
        self.header, self.stage, self.actions = schedule.header, stage, schedule[stage]
        self.forward_step, self.comm, self.tensor_shape, self.dtype = forward_step, comm, tensor_shape, dtype
        self.weights, self.loss_scale, self.grad_buffers = weights, loss_scale, grad_buffers
        self.deallocate = deallocate_outputs
        self.m = self.header.num_microbatches
        self.targets = self.header.carries_targets
        self.targets_spec = [(tuple(shape), dt) for shape, dt in targets_spec or ()]
        self.grad_enabled = torch.is_grad_enabled()
        # (chunk, mb) whose backward sends upstream: an input gradient, or the targets it received.
        self.sends_back = needs_input_grad(schedule, stage)
        self.want_input_grad = frozenset() if self.targets else self.sends_back
        self.sends_output = {(a.chunk, a.mb) for a in self.actions if a.kind is ActionKind.SEND_F}
        # A backward seeded by exit losses only never uses the output: keeping it would keep the graph of
        # the layers after the exit alive for nothing.
        self.exit_seeded = {(a.chunk, a.mb) for a in self.actions if a.kind is ActionKind.B_EXIT}
        self.last_backward = {a.chunk: i for i, a in enumerate(self.actions) if a.kind in BACKWARD_KINDS}
        self.received: dict[tuple[ActionKind, int, int], torch.Tensor] = {}
        self.to_send: dict[tuple[ActionKind, int, int], torch.Tensor] = {}
        self.pending: dict[tuple[int, int], _Pending] = {}
        self.losses = StepLosses()

    def execute(self, i: int, batch: Sequence[Action]) -> None:
        """Action ``i``, or the communication batch starting there."""
        a = batch[0]
        buffers = None if self.grad_buffers is None else self.grad_buffers[a.chunk]
        if a.is_comm:
            self.communicate(batch)
        elif a.kind in BACKWARD_KINDS:
            if buffers is not None and self.last_backward.get(a.chunk) == i:
                buffers.start_grad_sync()
            self.backward(a)
        elif a.kind is ActionKind.GRAD_SYNC:
            if buffers is not None:
                buffers.launch_remaining()
        else:
            self.forward(a)

    def _specs(self, a: Action) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """Shapes and dtypes of the tensors the message of ``a`` is made of."""
        if self.targets and a.kind in (ActionKind.SEND_B, ActionKind.RECV_B):
            return self.targets_spec
        return [(self.tensor_shape, self.dtype)]

    def communicate(self, batch: Sequence[Action]) -> None:
        sent = [(a, self.to_send.pop((a.kind, a.chunk, a.mb))) for a in batch if a.kind in _SENDS]
        recv_actions = [a for a in batch if a.kind not in _SENDS]
        if self.comm is None:
            raise RuntimeError("this schedule communicates between stages but no PipelineP2P was given")
        parts = [(t if isinstance(t, tuple) else (t,), a) for a, t in sent]
        recvs = [(shape, dt, a.peer) for a in recv_actions for shape, dt in self._specs(a)]
        tensors = iter(self.comm.exchange([(x, a.peer) for ts, a in parts for x in ts], recvs))
        for a, t in sent:
            # The exchange has completed: the data went out and only the graph is needed now.
            if self.deallocate and a.kind is ActionKind.SEND_F and t.requires_grad:
                free_output(t)
        for a in recv_actions:
            message = tuple(next(tensors) for _ in self._specs(a))
            targets = self.targets and a.kind is ActionKind.RECV_B
            self.received[(a.kind, a.chunk, a.mb)] = message if targets else message[0]

    def _account(self, out) -> torch.Tensor | None:
        """Log a step output's losses and metrics; its weighted, normalised loss to back-propagate."""
        total = None
        for layer, value in sorted(out.exit_losses.items()):
            self.losses.add(f"early loss [{layer}]", value)
            term = value * (self.weights.get(layer, 1.0) / self.m)
            total = term if total is None else total + term
        for key, value in sorted(getattr(out, "metrics", {}).items()):
            self.losses.add(key, value)
        aux = getattr(out, "aux_loss", None)
        if aux is not None:
            total = aux / self.m if total is None else total + aux / self.m
        return total

    def forward(self, a: Action) -> None:
        key, header, m = (a.chunk, a.mb), self.header, self.m
        position = header.position(self.stage, a.chunk)
        x = self.received.pop((ActionKind.RECV_F, a.chunk, a.mb), None) if position > 0 else None
        if x is not None and key in self.want_input_grad:
            x.requires_grad_()
        freed = self.deallocate and a.kind is ActionKind.F and key in self.sends_output
        grad = a.kind is ActionKind.F and self.grad_enabled
        with torch.set_grad_enabled(grad), saving_aliases() if freed else nullcontext():
            out = self.forward_step(a.chunk, a.mb, x)
        exit_loss = self._account(out)
        output = out.output
        last = position == header.num_positions - 1
        # The plan, not the position alone, says whether this output is the final loss: an EE-Tuning
        # stream run over the first k stages ends on a stage that has no head.
        if last and header.routes[a.mb].final_loss and not self.targets:
            self.losses.add("lm loss", output)
            output = output / m
        elif key in self.sends_output:
            self.to_send[(ActionKind.SEND_F, a.chunk, a.mb)] = output
        if self.targets and not last:
            output = None  # a targets backward never reads the hidden state; the last keeps its targets
        if a.kind is ActionKind.F:
            self.pending[key] = _Pending(x, None if key in self.exit_seeded else output, exit_loss,
                                         getattr(out, "deferred", None))

    def backward_targets(self, a: Action, p: _Pending) -> None:
        """A B of a ``carries_targets`` schedule (see the module docstring)."""
        targets = self.received.pop((ActionKind.RECV_B, a.chunk, a.mb), None)
        targets = p.output if targets is None else targets
        if targets is None:
            raise RuntimeError(f"{a} has no targets from downstream")
        exit_loss = p.exit_loss
        late = None if p.deferred is None else self._account(p.deferred(targets))
        if late is not None:
            exit_loss = late if exit_loss is None else exit_loss + late
        backward_step(None, None, exit_loss, self.loss_scale, None)
        if (a.chunk, a.mb) in self.sends_back:
            self.to_send[(ActionKind.SEND_B, a.chunk, a.mb)] = targets

    def backward(self, a: Action) -> None:
        p = self.pending.pop((a.chunk, a.mb))
        if self.targets:
            return self.backward_targets(a, p)
        grad = self.received.pop((ActionKind.RECV_B, a.chunk, a.mb), None)
        seeded_by_output = a.kind is not ActionKind.B_EXIT
        if seeded_by_output and grad is None and p.output is not None and p.output.dim() != 0:
            raise RuntimeError(f"{a} has no gradient from downstream")
        input_grad = backward_step(
            p.output if seeded_by_output else None,
            grad if seeded_by_output else None,
            p.exit_loss,
            self.loss_scale,
            p.input if (a.chunk, a.mb) in self.want_input_grad else None,
        )
        if input_grad is not None:
            self.to_send[(ActionKind.SEND_B, a.chunk, a.mb)] = input_grad


class PipelineStepError(RuntimeError):
    """An action of a pipeline schedule failed: says which stage, which action (index and name, or the
    whole communication batch) and why, and draws the schedule so the failure can be placed in it."""

    def __init__(self, schedule: Schedule, stage: int, start: int, stop: int, cause: BaseException):
        actions = schedule[stage]
        failed = list(actions[start:stop])
        what = ("after its last action" if not failed else
                f"action {start} {failed[0]}" if len(failed) == 1 else
                f"actions {start}..{stop - 1} (one communication batch: {', '.join(map(str, failed))})")
        around = [f"  {'>>' if start <= k < max(stop, start + 1) else '  '} {k:4d} {actions[k]}"
                  for k in range(max(0, start - 3), min(len(actions), stop + 3))]
        super().__init__(
            f"pipeline stage {stage} failed in schedule {schedule.header.name!r} at {what}: "
            f"{type(cause).__name__}: {cause}\n"
            f"stage {stage}'s actions around it:\n" + "\n".join(around) + "\n"
            f"the schedule (simulated times, forward 1, backward {_ratio(schedule)}):\n" + _grid(schedule))
        self.stage, self.index, self.actions = stage, start, failed


def _ratio(schedule: Schedule) -> float:
    return schedule.header.backward_forward_ratio or 2.0


def _grid(schedule: Schedule) -> str:
    try:
        return ascii_grid(simulate(schedule, Costs.from_ratio(_ratio(schedule))), schedule.header)
    except ScheduleError as e:  # a schedule that cannot even be simulated says so instead
        return f"(cannot be drawn: {e})"
