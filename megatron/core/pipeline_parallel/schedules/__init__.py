"""Pipeline schedules as pure data: types, generators, validator, simulator, ASCII rendering.

Everything here is process-free; the runtime that executes a :class:`Schedule` lives elsewhere in
``megatron.core.pipeline_parallel`` and relies only on the types and rules documented in ``actions.py``.
"""

from .actions import (
    BACKWARD_KINDS,
    COMM_KINDS,
    COMPUTE_KINDS,
    FORWARD_KINDS,
    Action,
    ActionKind,
    Route,
    Schedule,
    ScheduleError,
    ScheduleHeader,
    needs_input_grad,
)
from .engine import Span
from .filling import early_exit_bubble_filling, fill_counts
from .generators import ee_tuning_stream, ee_tuning_with_teacher, forward_only, interleaved_one_f_one_b, no_pipelining, one_f_one_b
from .render import ascii_grid
from .simulate import Costs, SimResult, simulate
from .validate import validate

__all__ = [
    "Action",
    "ActionKind",
    "BACKWARD_KINDS",
    "COMM_KINDS",
    "COMPUTE_KINDS",
    "Costs",
    "FORWARD_KINDS",
    "Route",
    "Schedule",
    "ScheduleError",
    "ScheduleHeader",
    "SimResult",
    "Span",
    "ascii_grid",
    "early_exit_bubble_filling",
    "ee_tuning_stream",
    "ee_tuning_with_teacher",
    "fill_counts",
    "forward_only",
    "interleaved_one_f_one_b",
    "needs_input_grad",
    "no_pipelining",
    "one_f_one_b",
    "simulate",
    "validate",
]
