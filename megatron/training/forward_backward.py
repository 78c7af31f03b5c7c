"""One training (or evaluation) step of an early-exit GPT over the pipeline: pick the schedule, bind the
model chunks and the data to the runtime, and bring the gradients to their final values.

* :func:`build_schedule` chooses the generator from the run's options (no pipelining, 1F1B, interleaved,
  bubble filling, the EE-Tuning stream, forward-only) -- the only place that decision is made.
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
from megatron.core.pipeline_parallel.runtime import StepLosses, run_schedule
from megatron.core.pipeline_parallel.schedules import (
    Costs,
    Schedule,
    ScheduleError,
    early_exit_bubble_filling,
    ee_tuning_stream,
    forward_only,
    interleaved_one_f_one_b,
    no_pipelining,
    one_f_one_b,
)
from megatron.model.early_exit_gpt_model import StageOutput

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


def build_schedule(pp: int, vpp: int, m: int, exit_positions: Sequence[int], opts: ScheduleOptions,
                   evaluation: bool = False, costs: Costs | None = None) -> Schedule:
    """The step's schedule (training, and ``tools/show_schedule.py``). ``exit_positions``: the pipeline
    position ``chunk * pp + stage`` of each exit head (``Partition.exit_positions``; where exit heads cost
    time in the simulator). ``costs``: the cost model bubble filling fits its fills to (default: forward
    1, backward ``--backward-forward-ratio``)."""
    if (opts.fill_explicit_bubbles or opts.tune_exit) and vpp > 1:
        raise ScheduleError("--fill-explicit-bubbles and --tune-exit need no virtual pipeline (drop "
                            "--num-layers-per-virtual-pipeline-stage)")
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


def gpt_forward_step(chunks: Sequence[torch.nn.Module], batch: Callable[[int], Batch]):
    """``forward_step(chunk, mb, input)`` for the runtime. ``batch(mb)`` returns the microbatch ``mb``
    (global id): ``tokens``, ``labels``, ``loss_mask``, optionally ``position_ids`` and
    ``attention_mask``; every chunk reads it (exits need the labels on middle stages)."""

    def step(chunk: int, mb: int, hidden: torch.Tensor | None) -> StageOutput:
        model = chunks[chunk]
        data = batch(mb)
        out = model(
            input_ids=data["tokens"] if model.spec.has_embedding else None,
            position_ids=data.get("position_ids"),
            attention_mask=data.get("attention_mask"),
            labels=data["labels"],
            hidden_states=hidden,
        )
        mask = data["loss_mask"]
        output = _masked_mean(out.output, mask) if model.spec.has_head else out.output
        return StageOutput(output, {layer: _masked_mean(v, mask) for layer, v in out.exit_losses.items()})

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
    losses = run_schedule(
        schedule,
        state.pp_rank,
        gpt_forward_step(chunks, batch),
        comm=PipelineP2P(state) if state.pp > 1 else None,
        tensor_shape=tensor_shape,
        dtype=dtype or next(chunks[0].parameters()).dtype,
        exit_weights=exit_weights,
        loss_scale=loss_scale,
        grad_buffers=grad_buffers,
        deallocate_outputs=deallocate_outputs,
    )
    if grad_buffers is not None:
        finalize_model_grads(chunks, grad_buffers, state, tied_groups)
    return losses
