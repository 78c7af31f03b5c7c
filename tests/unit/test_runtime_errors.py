"""A failing pipeline action names its stage, index and action, shows the stage's actions around it and
draws the schedule (issue 17, section 4), keeping the original exception as the cause."""

from types import SimpleNamespace

import pytest
import torch

from megatron.core.pipeline_parallel.runtime import PipelineStepError, run_schedule
from megatron.core.pipeline_parallel.schedules import early_exit_bubble_filling, one_f_one_b


def _step(fail_mb):
    w = torch.nn.Parameter(torch.ones(2, 2))

    def forward_step(chunk, mb, x):
        if mb == fail_mb:
            raise ValueError(f"bad data in microbatch {mb}")
        return SimpleNamespace(output=(torch.ones(3, 2, 2) @ w), exit_losses={})

    return forward_step


def test_a_failing_forward_names_stage_action_and_index():
    schedule = early_exit_bubble_filling(4, 8, [0, 1], 2, 2, 2.0)
    actions = schedule[0]
    index = next(i for i, a in enumerate(actions) if a.kind.name == "F" and a.mb == 9)  # a warm-up fill
    with pytest.raises(PipelineStepError) as info:
        run_schedule(schedule, 0, _step(9), comm=SimpleNamespace(exchange=lambda sends, recvs: []),
                     tensor_shape=(3, 2, 2), dtype=torch.float32)
    err = info.value
    text = str(err)
    assert (err.stage, err.index, err.actions) == (0, index, [actions[index]])
    assert text.startswith(f"pipeline stage 0 failed in schedule 'early_exit_bubble_filling' at action {index} "
                           "F(c0,mb9): ValueError: bad data in microbatch 9\n")
    assert f">> {index:4d} F(c0,mb9)" in text  # the stage's actions around it, the failing one marked
    assert "stage  3 " in text and "warm-up fills (mb, deepest stage): (8, 1), (9, 0)" in text  # the grid
    assert isinstance(err.__cause__, ValueError)


def test_a_failing_communication_batch_is_named_whole():
    schedule = one_f_one_b(2, 2)
    with pytest.raises(PipelineStepError) as info:
        run_schedule(schedule, 0, _step(None), comm=None, tensor_shape=(3, 2, 2), dtype=torch.float32)
    text = str(info.value)
    assert "pipeline stage 0 failed in schedule '1f1b' at action 1 SEND_F(c0,mb0->s1c0): RuntimeError: this " \
           "schedule communicates between stages but no PipelineP2P was given" in text
    assert "stage  1 " in text and "bubble fraction" in text
