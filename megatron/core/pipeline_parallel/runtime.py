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
by the number of ordinary microbatches ``m`` (Megatron's convention; fill microbatches of bubble
filling are normalised by ``m`` too), exit losses are multiplied by their weight, and the loss scale
is applied in ``backward_step``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

import torch

from .backward import backward_step
from .p2p import PipelineP2P
from .schedules import BACKWARD_KINDS, Action, ActionKind, Schedule, needs_input_grad

__all__ = ["run_schedule", "StepLosses", "ForwardStep"]


class _StageOutput(Protocol):
    output: torch.Tensor
    exit_losses: Mapping[int, torch.Tensor]


ForwardStep = Callable[[int, int, "torch.Tensor | None"], _StageOutput]


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
    output: torch.Tensor | None
    exit_loss: torch.Tensor | None


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
    """
    header = schedule.header
    actions = schedule[stage]
    m = header.num_microbatches
    last_position = header.num_positions - 1
    weights = dict(exit_weights or {})
    want_input_grad = needs_input_grad(schedule, stage)
    sends_output = {(a.chunk, a.mb) for a in actions if a.kind is ActionKind.SEND_F}
    last_backward = {a.chunk: i for i, a in enumerate(actions) if a.kind in BACKWARD_KINDS}

    received: dict[tuple[ActionKind, int, int], torch.Tensor] = {}
    to_send: dict[tuple[ActionKind, int, int], torch.Tensor] = {}
    pending: dict[tuple[int, int], _Pending] = {}
    losses = StepLosses()

    def communicate(batch: list[Action]) -> None:
        sends, recvs = [], []
        for a in batch:
            if a.kind in (ActionKind.SEND_F, ActionKind.SEND_B):
                sends.append((to_send.pop((a.kind, a.chunk, a.mb)), a.peer))
            else:
                recvs.append((tuple(tensor_shape), dtype, a.peer))
        if comm is None:
            raise RuntimeError("this schedule communicates between stages but no PipelineP2P was given")
        tensors = comm.exchange(sends, recvs)
        recv_actions = [a for a in batch if a.kind in (ActionKind.RECV_F, ActionKind.RECV_B)]
        for a, t in zip(recv_actions, tensors):
            received[(a.kind, a.chunk, a.mb)] = t

    def forward(a: Action) -> None:
        position = header.position(stage, a.chunk)
        x = received.pop((ActionKind.RECV_F, a.chunk, a.mb), None) if position > 0 else None
        if x is not None and (a.chunk, a.mb) in want_input_grad:
            x.requires_grad_()
        with torch.set_grad_enabled(a.kind is ActionKind.F):
            out = forward_step(a.chunk, a.mb, x)
        exit_loss = None
        for layer, value in sorted(out.exit_losses.items()):
            losses.add(f"early loss [{layer}]", value)
            term = value * (weights.get(layer, 1.0) / m)
            exit_loss = term if exit_loss is None else exit_loss + term
        output = out.output
        # The plan, not the position alone, says whether this output is the final loss: an EE-Tuning
        # stream run over the first k stages ends on a stage that has no head.
        if position == last_position and header.routes[a.mb].final_loss:
            losses.add("lm loss", output)
            output = output / m
        elif (a.chunk, a.mb) in sends_output:
            to_send[(ActionKind.SEND_F, a.chunk, a.mb)] = output
        if a.kind is ActionKind.F:
            pending[(a.chunk, a.mb)] = _Pending(x, output, exit_loss)

    def backward(a: Action) -> None:
        p = pending.pop((a.chunk, a.mb))
        grad = received.pop((ActionKind.RECV_B, a.chunk, a.mb), None)
        seeded_by_output = a.kind is not ActionKind.B_EXIT
        if seeded_by_output and grad is None and p.output is not None and p.output.dim() != 0:
            raise RuntimeError(f"stage {stage}: {a} has no gradient from downstream")
        input_grad = backward_step(
            p.output if seeded_by_output else None,
            grad if seeded_by_output else None,
            p.exit_loss,
            loss_scale,
            p.input if (a.chunk, a.mb) in want_input_grad else None,
        )
        if input_grad is not None:
            to_send[(ActionKind.SEND_B, a.chunk, a.mb)] = input_grad

    i = 0
    while i < len(actions):
        a = actions[i]
        if a.is_comm:
            j = i
            while j < len(actions) and actions[j].is_comm:
                j += 1
            communicate(list(actions[i:j]))
            i = j
            continue
        if a.kind in BACKWARD_KINDS:
            if grad_buffers is not None and last_backward.get(a.chunk) == i and grad_buffers[a.chunk] is not None:
                grad_buffers[a.chunk].start_grad_sync()
            backward(a)
        elif a.kind is ActionKind.GRAD_SYNC:
            if grad_buffers is not None and grad_buffers[a.chunk] is not None:
                grad_buffers[a.chunk].launch_remaining()
        else:
            forward(a)
        i += 1
    if pending and any(a.kind in BACKWARD_KINDS for a in actions):
        leftover = sorted(k for k, p in pending.items())
        raise RuntimeError(f"stage {stage}: forwards {leftover} were never back-propagated")
    return losses
