"""One training (or evaluation) step of an early-exit GPT over the pipeline: pick the schedule, bind the
model chunks and the data to the runtime, and bring the gradients to their final values.

* :func:`build_schedule` chooses the generator from the run's options (no pipelining, 1F1B, interleaved,
  bubble filling, the EE-Tuning stream, EE-Tuning with the final head as teacher, forward-only) -- the only
  place that decision is made.
* :func:`gpt_forward_step` adapts :class:`~megatron.model.EarlyExitGPTModel` chunks to the runtime's
  ``forward_step(chunk, mb, input)`` contract: per-token losses become masked token means per microbatch
  (Megatron's loss), exit losses stay keyed by layer.
* :func:`forward_backward` runs the schedule and :func:`finalize_model_grads`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from megatron.core.distributed.finalize import TiedGroups, finalize_model_grads
from megatron.core.parallel_state import ParallelState
from megatron.core.pipeline_parallel.p2p import PipelineP2P
from megatron.core.pipeline_parallel.runtime import StepLosses, StepOutput, run_schedule
from megatron.core.pipeline_parallel.schedules import (
    Costs,
    Schedule,
    ScheduleError,
    ScheduleHeader,
    early_exit_bubble_filling,
    ee_tuning_stream,
    ee_tuning_with_teacher,
    forward_only,
    interleaved_one_f_one_b,
    no_pipelining,
    one_f_one_b,
)
from megatron.model.exit_objective import ExitTerms, TeacherTargets, target_message_specs

__all__ = ["ScheduleOptions", "build_schedule", "gpt_forward_step", "forward_backward", "activation_shape"]

Batch = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class ScheduleOptions:
    """What decides the pipeline schedule (from ``--fill-explicit-bubbles`` and friends)."""

    fill_explicit_bubbles: bool = False
    num_fill_warmup_microbatches: int | None = None
    num_fill_cooldown_microbatches: int | None = None
    backward_forward_ratio: float = 2.0
    tune_exit: bool = False
    teacher: bool = False  # the exits' objective needs the final head (EarlyExitConfig.needs_teacher)


def build_schedule(pp: int, vpp: int, m: int, exit_positions: Sequence[int], opts: ScheduleOptions,
                   evaluation: bool = False, costs: Costs | None = None) -> Schedule:
    """The step's schedule (training, and ``tools/show_schedule.py``). ``exit_positions``: the pipeline
    position ``chunk * pp + stage`` of each exit head (``Partition.exit_positions``; where exit heads cost
    time in the simulator). ``costs``: the cost model bubble filling fits its fills to (default: forward
    1, backward ``--backward-forward-ratio``)."""
    if (opts.fill_explicit_bubbles or opts.tune_exit) and vpp > 1:
        raise ScheduleError("--fill-explicit-bubbles and --tune-exit need no virtual pipeline (drop "
                            "--num-layers-per-virtual-pipeline-stage)")
    if opts.tune_exit and opts.teacher:  # evaluation too: the targets must reach the exits
        return ee_tuning_with_teacher(pp, m, exit_positions)
    if evaluation:
        return forward_only(pp, m, vpp, exit_positions)
    if opts.tune_exit:
        return ee_tuning_stream(pp, m, exit_positions)
    if opts.fill_explicit_bubbles:
        return early_exit_bubble_filling(pp, m, exit_positions, opts.num_fill_warmup_microbatches,
                                         opts.num_fill_cooldown_microbatches, opts.backward_forward_ratio, costs)
    if vpp > 1:
        return interleaved_one_f_one_b(pp, vpp, m, exit_positions)
    return one_f_one_b(pp, m, exit_positions) if pp > 1 else no_pipelining(m, exit_positions)


def activation_shape(seq_length: int, micro_batch_size: int, hidden_size: int, tp: int,
                     sequence_parallel: bool) -> tuple[int, int, int]:
    """Shape of the hidden state exchanged between stages: ``[s, b, h]``, ``s / tp`` under sequence
    parallelism."""
    s = seq_length // tp if sequence_parallel and tp > 1 else seq_length
    return (s, micro_batch_size, hidden_size)


def _masked_mean(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    mask = loss_mask.to(per_token.dtype if per_token.is_floating_point() else torch.float32)
    return (per_token.float() * mask).sum() / mask.sum().clamp(min=1)


def _exit_step(model, terms: Mapping[int, ExitTerms], mask: torch.Tensor, output=None) -> StepOutput:
    """The runtime's view of the exits' terms: masked means per microbatch; the estimators' weighted loss
    is the aux loss, their unweighted loss and the agreement are logged."""
    losses = {layer: _masked_mean(t.loss, mask) for layer, t in terms.items()}
    metrics = {f"exit agreement [{layer}]": _masked_mean(t.agree, mask) for layer, t in terms.items()}
    aux = None
    for layer, t in terms.items():
        if t.estimator is not None:
            value = _masked_mean(t.estimator, mask)
            metrics[f"estimator loss [{layer}]"] = value
            term = value * model.ee.exit_estimator_loss_weight
            aux = term if aux is None else aux + term
    return StepOutput(output, losses, metrics, aux)


def gpt_forward_step(chunks: Sequence[torch.nn.Module], batch: Callable[[int], Batch],
                     header: ScheduleHeader | None = None):
    """``forward_step(chunk, mb, input)`` for the runtime. ``batch(mb)`` returns the microbatch ``mb``
    (global id): ``tokens``, ``labels``, ``loss_mask``, optionally ``position_ids`` and
    ``attention_mask``; every chunk reads it (exits need the labels on middle stages).

    The schedule's ``header`` decides two EE-Tuning shortcuts: a chunk where a microbatch's forward ends
    without the final loss (the tuning stream's deepest exit stage) stops after its last exit; with
    ``carries_targets`` the exits' losses wait for the final head's targets (computed on the head chunk,
    where they are used at once and become the message sent back)."""

    def step(chunk: int, mb: int, hidden: torch.Tensor | None) -> StepOutput:
        model = chunks[chunk]
        data = batch(mb)
        teacher = header is not None and header.carries_targets
        stop = False
        if header is not None and not teacher:
            route = header.routes[mb]
            stop = not route.final_loss and route.fwd_last == header.position(model.spec.stage, model.spec.chunk)
        out = model(
            input_ids=data["tokens"] if model.spec.has_embedding else None,
            position_ids=data.get("position_ids"),
            attention_mask=data.get("attention_mask"),
            labels=data["labels"],
            hidden_states=hidden,
            teacher=teacher,
            stop_after_exits=stop,
        )
        mask, labels = data["loss_mask"], data["labels"]
        if teacher:
            states = out.exit_states  # only these wait for the targets (not the hidden state sent on)

            def deferred(message):
                targets = TeacherTargets.from_message(message)
                return _exit_step(model, model.exit_objective(states, labels, targets), mask)

            if model.spec.has_head:
                return _exit_step(model, model.exit_objective(out.exit_states, labels, out.output), mask,
                                  out.output.as_message())
            return StepOutput(out.output, deferred=deferred if out.exit_states else None)
        output = _masked_mean(out.output, mask) if model.spec.has_head and not stop else out.output
        return StepOutput(output, {layer: _masked_mean(v, mask) for layer, v in out.exit_losses.items()})

    return step


def forward_backward(
    schedule: Schedule,
    chunks: Sequence[torch.nn.Module],
    batch: Callable[[int], Batch],
    state: ParallelState,
    *,
    tensor_shape: Sequence[int],
    exit_weights: Mapping[int, float],
    grad_buffers: Sequence | None = None,
    tied_groups: TiedGroups | None = None,
    loss_scale: float | torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    deallocate_outputs: bool = True,
) -> StepLosses:
    """Run this rank's part of ``schedule``; with ``grad_buffers``, finish with every gradient final
    in ``main_grad`` (tp / tied / dp reductions). Returns this rank's unweighted losses.
    ``deallocate_outputs``: see :func:`~megatron.core.pipeline_parallel.runtime.run_schedule`."""
    header = schedule.header
    targets_spec = None
    if header.carries_targets:
        model = chunks[0]
        targets_spec = target_message_specs(tensor_shape[1], model.config.seq_length,
                                            model.ee.exit_distillation_top_k)
    losses = run_schedule(
        schedule,
        state.pp_rank,
        gpt_forward_step(chunks, batch, header),
        comm=PipelineP2P(state) if state.pp > 1 else None,
        tensor_shape=tensor_shape,
        dtype=dtype or next(chunks[0].parameters()).dtype,
        exit_weights=exit_weights,
        loss_scale=loss_scale,
        grad_buffers=grad_buffers,
        deallocate_outputs=deallocate_outputs,
        targets_spec=targets_spec,
    )
    if grad_buffers is not None:
        finalize_model_grads(chunks, grad_buffers, state, tied_groups)
    return losses
