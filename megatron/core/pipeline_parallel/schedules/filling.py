"""Early-exit bubble filling (``--fill-explicit-bubbles``): 1F1B plus extra exit-training work placed in
the explicit bubbles, derived from ONE global plan so every stage pairs the same data.

* **Warm-up fill** microbatches (ids ``m .. m+nw-1``): a partial forward through stages ``0 .. d`` where
  stage ``d`` holds an exit, then a backward seeded by the exit losses at ``d`` (B_EXIT) and chained
  down to stage 0. On each stage they run after the 1F1B warm-up forwards, forwards in id order and
  backwards in reverse (the deepest fill, issued first, has the longest way back).
* **Cool-down fill** microbatches (ids after the warm-up fills): extra microbatches appended to the
  1F1B order with a full forward (final loss and all exit losses) whose backward is truncated to
  stages ``t .. pp-1`` (B_TRUNC at ``t``); their forward fills the gaps of the early stages' cool-down
  and their backward the idle tail of the late stages. Stages below ``t`` run them as F_NOGRAD.

How much fits is decided by timing, not by a closed formula: the counts follow EE-LLM's rule
(:func:`fill_counts`, ``opt = int((pp-1) R / (1+R))``), then each fill is placed greedily (warm-up
fills as deep as possible, cool-down fills truncated as shallow as possible) and kept only if the
simulated makespan under ``costs`` (default: forward 1, backward ``R``) does not exceed plain 1F1B's.
So filling never lengthens the step under the cost model it was planned for, and ``R`` is really
used (EE-LLM hard-codes 2.0).

Objective and data read per step (and how they differ from EE-LLM's)
-------------------------------------------------------------------
A step reads ``m + nw + nc`` microbatches (``header.num_microbatches_total``): the ``m`` ordinary ones of
the global batch (``m = global batch / (micro batch * dp)``) plus the ``nw`` warm-up and ``nc`` cool-down
fills placed, in addition. Every loss is divided by ``m``. So with ``E_i`` microbatch ``i``'s weighted
exit losses and ``L_i`` its final loss, stage ``s`` accumulates the gradient of

    (1/m) * [ sum_{i < m} (L_i + E_i)                                  -- plain 1F1B, unchanged
              + sum_{warm-up fills reaching s} E_i(exits at or below their deepest stage)
              + sum_{cool-down fills whose backward covers s} (L_i + E_i)(their backward stages) ]

i.e. the ordinary batch trains exactly as without filling on every stage, and each fill adds its
gradient with the weight of one ordinary microbatch where its backward runs. The late stages (those a
cool-down fill's truncated backward covers) thus get ``(m + fills covering them) / m`` times the
lm-loss gradient mass of the early ones; the logged ``lm loss`` is the mean over every microbatch whose
forward reached the head (``m + nc``).

EE-LLM instead takes its fills out of the global batch: of the ``M`` microbatches it reads, ``Fw`` are
warm-up fills, the last ``Fc`` full ones get the truncated backward, and every loss is divided by
``M - Fw``. Turning filling on there trains the early stages on ``M - Fw - Fc`` of the ``M`` samples
and scales their lm-loss gradient by ``(M - Fw - Fc) / (M - Fw)`` (at pp = 4, M = 8, Fw = Fc = 2:
4/6), while the samples read per step stay the global batch. We keep the paper's intent -- the
bubbles get *extra* work at no extra time -- so enabling filling never takes training signal from the
backbone; the price is that a step consumes more samples than ``--global-batch-size``: the
consumed-samples counter (and the data built for ``--train-iters`` / ``--train-samples``) counts them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from .actions import Route, Schedule, ScheduleError, ScheduleHeader
from .build import assemble, backward, forward
from .generators import check_exits, check_sizes, full_routes, one_f_one_b, one_f_one_b_order
from .simulate import Costs, simulate

__all__ = ["fill_counts", "early_exit_bubble_filling"]

_EPS = 1e-9


def fill_counts(pp: int, backward_forward_ratio: float = 2.0, fw: int | None = None,
                fc: int | None = None) -> tuple[int, int]:
    """EE-LLM's rule for the fill counts (the ``--fill-explicit-bubbles`` block of ``validate_args`` in its
    ``megatron/arguments.py``), with negative counts rejected.

    ``opt = int((pp - 1) * R / (1 + R))``; None becomes ``opt``; a value above ``opt`` is clamped to it
    with a warning; smaller values are kept."""
    if pp <= 1:
        raise ScheduleError("--fill-explicit-bubbles needs --pipeline-model-parallel-size > 1")
    if not backward_forward_ratio > 0:
        raise ScheduleError(f"--backward-forward-ratio must be > 0, got {backward_forward_ratio}")
    opt = int((pp - 1) * backward_forward_ratio / (1 + backward_forward_ratio))
    out = []
    for value, flag in ((fw, "--num-fill-warmup-microbatches"), (fc, "--num-fill-cooldown-microbatches")):
        if value is None:
            value = opt
        elif value < 0:
            raise ScheduleError(f"{flag} must be >= 0, got {value}")
        elif value > opt:
            warnings.warn(f"{flag}={value} exceeds the {opt} that fit the bubbles "
                          f"(pp={pp}, R={backward_forward_ratio}); using {opt}", stacklevel=2)
            value = opt
        out.append(value)
    return out[0], out[1]


def _build(pp: int, m: int, heads: Sequence[int], depths: Sequence[int], truncs: Sequence[int],
           ratio: float) -> Schedule:
    """The filled schedule for warm-up fills of the given depths and cool-down fills truncated at
    the given stages (both lists in fill order)."""
    last = pp - 1
    routes = full_routes(m, pp)
    for d in depths:
        routes.append(Route(len(routes), "warmup_fill", d, tuple(range(d + 1)), final_loss=False))
    for t in truncs:
        routes.append(Route(len(routes), "cooldown_fill", last, tuple(range(t, pp))))
    header = ScheduleHeader("early_exit_bubble_filling", pp, 1, m, tuple(routes), tuple(heads), ratio)
    warm_ids = [r.mb for r in routes if r.role == "warmup_fill"]
    main_ids = [r.mb for r in routes if r.role in ("full", "cooldown_fill")]

    def order(stage: int):
        mine = [mb for mb in warm_ids if routes[mb].fwd_last >= stage]
        fill = [forward(header, stage, mb) for mb in mine] + [backward(header, stage, mb) for mb in reversed(mine)]
        return one_f_one_b_order(header, stage, main_ids, fill)

    return assemble(header, {stage: order(stage) for stage in range(pp)})


def early_exit_bubble_filling(
    pp: int,
    m: int,
    exit_stages: Sequence[int],
    fill_warmup: int | None = None,
    fill_cooldown: int | None = None,
    backward_forward_ratio: float = 2.0,
    costs: Costs | None = None,
) -> Schedule:
    """1F1B over ``m`` microbatches with warm-up and cool-down fill microbatches (module docstring).

    ``exit_stages``: the stage of each exit head (a stage with two exits appears twice; warm-up fills
    end on one of these stages, never on the last one). ``fill_warmup`` / ``fill_cooldown``: upper bounds (None: automatic, see
    :func:`fill_counts`); fewer are planned when the bubbles have no room. ``costs``: the cost model
    used to fit the fills (default ``Costs.from_ratio(backward_forward_ratio)``). The placed fills are
    in ``header.fill_warmup`` / ``header.fill_cooldown``."""
    check_sizes(pp, m)
    fw, fc = fill_counts(pp, backward_forward_ratio, fill_warmup, fill_cooldown)
    heads = check_exits(pp, exit_stages, "--fill-explicit-bubbles")
    costs = costs or Costs.from_ratio(backward_forward_ratio)
    limit = simulate(one_f_one_b(pp, m, heads), costs).makespan + _EPS

    def fits(depths: Sequence[int], truncs: Sequence[int]) -> bool:
        trial = _build(pp, m, heads, depths, truncs, backward_forward_ratio)
        return simulate(trial, costs).makespan <= limit

    depths: list[int] = []
    candidates = [d for d in sorted(set(heads), reverse=True) if d < pp - 1]  # the last stage has no warm-up bubble
    for _ in range(fw):
        # Deeper fills than the previous one gain nothing: the bubble shrinks with depth and with time.
        allowed = [d for d in candidates if not depths or d <= depths[-1]]
        chosen = next((d for d in allowed if fits(depths + [d], [])), None)
        if chosen is None:
            break
        depths.append(chosen)
    truncs: list[int] = []
    for _ in range(fc):
        start = truncs[-1] if truncs else 1  # stage 0 never truncates: that would be a full microbatch
        chosen = next((t for t in range(start, pp) if fits(depths, truncs + [t])), None)
        if chosen is None:
            break
        truncs.append(chosen)
    return _build(pp, m, heads, depths, truncs, backward_forward_ratio)
