"""Pure schedule generators: no pipelining, 1F1B, interleaved 1F1B, forward-only, EE-Tuning stream, and
EE-Tuning with a teacher (the final head's targets travel back where gradients would).

Each generator writes the global plan (one :class:`Route` per microbatch), orders each stage's compute
actions, and lets :func:`assemble` derive the communication. Exits need no special schedule: a stage's
backward always includes its exit losses, so plain 1F1B is also early-exit 1F1B. The optional
``exits`` argument (the model position of each exit head, i.e. its stage when vpp == 1; a position
with two exits appears twice) only goes into the header, so that ``simulate`` charges exit heads.
Bubble filling lives in ``filling.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .actions import Action, Route, Schedule, ScheduleError, ScheduleHeader
from .build import Exchange, Item, assemble, backward, forward

__all__ = [
    "no_pipelining",
    "one_f_one_b",
    "interleaved_one_f_one_b",
    "forward_only",
    "ee_tuning_stream",
    "ee_tuning_with_teacher",
    "full_routes",
    "one_f_one_b_order",
    "check_sizes",
    "check_exits",
]


def check_sizes(pp: int, m: int, vpp: int = 1) -> None:
    """Reject sizes no schedule can use, naming the flag."""
    if pp < 1:
        raise ScheduleError(f"--pipeline-model-parallel-size must be >= 1, got {pp}")
    if vpp < 1:
        raise ScheduleError(f"virtual pipeline size must be >= 1, got {vpp}")
    if m < 1:
        raise ScheduleError(f"--num-microbatches must be >= 1, got {m}")


def full_routes(m: int, num_positions: int) -> list[Route]:
    """Ordinary microbatches 0..m-1: full forward, full backward from the final loss."""
    last = num_positions - 1
    return [Route(mb, "full", last, tuple(range(last + 1))) for mb in range(m)]


def one_f_one_b_order(
    header: ScheduleHeader, stage: int, mbs: Sequence[int], after_warmup: Sequence[Action] = ()
) -> list[Action]:
    """Compute order of the non-interleaved 1F1B schedule on ``stage`` over microbatches ``mbs``:
    ``pp - stage - 1`` warm-up forwards, then alternate F/B, then the cool-down backwards. Backwards
    the plan does not run on this stage are dropped; ``after_warmup`` is spliced in after the warm-up."""
    warm = min(header.pp - stage - 1, len(mbs))
    order = [forward(header, stage, mb) for mb in mbs[:warm]] + list(after_warmup)
    for i, mb in enumerate(mbs):
        if warm + i < len(mbs):
            order.append(forward(header, stage, mbs[warm + i]))
        if header.position(stage, 0) in header.routes[mb].bwd:
            order.append(backward(header, stage, mb))
    return order


def _per_stage(header: ScheduleHeader, order: Callable[[int], list[Action]]) -> Schedule:
    return assemble(header, {stage: order(stage) for stage in range(header.pp)})


def no_pipelining(m: int, exits: Sequence[int] = ()) -> Schedule:
    """One stage, gradient accumulation: F, B for each microbatch, then GRAD_SYNC."""
    check_sizes(1, m)
    header = ScheduleHeader("no_pipelining", 1, 1, m, tuple(full_routes(m, 1)), check_exits(1, exits))
    return _per_stage(header, lambda s: [a for mb in range(m) for a in (forward(header, 0, mb),
                                                                        backward(header, 0, mb))])


def one_f_one_b(pp: int, m: int, exits: Sequence[int] = ()) -> Schedule:
    """Megatron's non-interleaved 1F1B (PipeDream-Flush) over ``m`` microbatches."""
    check_sizes(pp, m)
    header = ScheduleHeader("1f1b", pp, 1, m, tuple(full_routes(m, pp)), check_exits(pp, exits))
    return _per_stage(header, lambda s: one_f_one_b_order(header, s, range(m)))


def _virtual(pp: int, vpp: int, k: int, backward_pass: bool) -> tuple[int, int]:
    """(chunk, mb) of the k-th virtual microbatch in Megatron's interleaved order: groups of ``pp``
    microbatches go through chunk 0, then chunk 1, ...; backwards visit the chunks in reverse."""
    group, within = divmod(k, pp * vpp)
    chunk = within // pp
    if backward_pass:
        chunk = vpp - 1 - chunk
    return chunk, group * pp + within % pp


def _check_interleaved(pp: int, vpp: int, m: int) -> None:
    check_sizes(pp, m, vpp)
    if m % pp:
        raise ScheduleError(
            f"the interleaved schedule needs --num-microbatches ({m}) to be a multiple of "
            f"--pipeline-model-parallel-size ({pp}); change the global batch size or micro batch size"
        )


def interleaved_one_f_one_b(pp: int, vpp: int, m: int, exits: Sequence[int] = ()) -> Schedule:
    """Megatron's interleaved 1F1B with ``vpp`` model chunks per stage (``m`` a multiple of ``pp``),
    with Megatron's batches: each iteration ends with one exchange whose receives line up with the
    neighbours' sends of the same iteration."""
    _check_interleaved(pp, vpp, m)
    if pp < 2:
        raise ScheduleError("the interleaved schedule needs --pipeline-model-parallel-size >= 2")
    routes = tuple(full_routes(m, pp * vpp))
    header = ScheduleHeader("interleaved_1f1b", pp, vpp, m, routes, check_exits(pp * vpp, exits))
    return assemble(header, {s: _interleaved_items(header, s) for s in range(pp)})


def _interleaved_items(header: ScheduleHeader, stage: int) -> list[Item]:
    pp, vpp, m = header.pp, header.vpp, header.num_microbatches
    total, first, last = m * vpp, stage == 0, stage == pp - 1

    def fwd(k: int) -> Action:
        chunk, mb = _virtual(pp, vpp, k, False)
        return forward(header, stage, mb, chunk)

    def bwd(k: int) -> Action:
        chunk, mb = _virtual(pp, vpp, k, True)
        return backward(header, stage, mb, chunk)

    all_warm = m == pp  # Megatron: then every forward runs before the first backward
    warm = total if all_warm else min((pp - stage - 1) * 2 + (vpp - 1) * pp, total)
    rem = total - warm
    items: list[Item] = [] if first else [Exchange(recv_prev=1)]
    for k in range(warm):
        # The first stage only receives (from the last stage) inputs of chunks > 0.
        recv_prev = k < total - 1 and not (first and fwd(k + 1).chunk == 0)
        recv_next = k == warm - 1 and not all_warm and not last
        items += [fwd(k), Exchange((fwd(k),), int(recv_prev), int(recv_next))]
    for k in range(rem):
        # The first stage runs pp-1 virtual microbatches ahead of the last: what arrives from the last
        # stage now belongs to the forward it ran pp-1 steps ago (symmetrically for backwards).
        recv_prev = k < rem - 1 and not (first and fwd(warm + k - (pp - 1)).chunk == vpp - 1)
        recv_next = not (last and bwd(k - (pp - 1)).chunk == 0)
        items += [fwd(warm + k), bwd(k), Exchange((fwd(warm + k), bwd(k)), int(recv_prev), int(recv_next))]
    if all_warm and not last:
        items.append(Exchange(recv_next=1))
    for k in range(rem, total):
        recv_next = k < total - 1 and not (last and bwd(k + 1).chunk == vpp - 1)
        items += [bwd(k), Exchange((bwd(k),), 0, int(recv_next))]
    return items


def forward_only(pp: int, m: int, vpp: int = 1, exits: Sequence[int] = ()) -> Schedule:
    """Evaluation: every microbatch forward through all positions without autograd (the runtime
    reports the final loss and every exit loss); no backward, no gradient sync."""
    if vpp > 1:
        _check_interleaved(pp, vpp, m)
    check_sizes(pp, m, vpp)
    last = pp * vpp - 1
    routes = tuple(Route(mb, "eval", last, (), chained=False) for mb in range(m))
    header = ScheduleHeader("forward_only", pp, vpp, m, routes, check_exits(pp * vpp, exits))
    virt = [_virtual(pp, vpp, k, False) for k in range(m * vpp)] if vpp > 1 else [(0, mb) for mb in range(m)]
    return _per_stage(header, lambda s: [forward(header, s, mb, c) for c, mb in virt])


def ee_tuning_stream(pp: int, m: int, exit_stages: Sequence[int]) -> Schedule:
    """EE-Tuning (``--tune-exit``): a forward-only stream up to the last stage holding an exit; each
    exit stage back-propagates its own exit losses right after the forward (B_EXIT), nothing is sent
    backward and no stage without exits keeps a graph. Stages past the last exit stage stay empty."""
    check_sizes(pp, m)
    heads = check_exits(pp, exit_stages, "--tune-exit")
    exits = sorted(set(heads))
    routes = tuple(Route(mb, "tune", exits[-1], tuple(exits), chained=False, final_loss=False)
                   for mb in range(m))
    header = ScheduleHeader("ee_tuning_stream", pp, 1, m, routes, heads)

    def order(stage: int) -> list[Action]:
        if stage > exits[-1]:
            return []
        out = []
        for mb in range(m):
            out.append(forward(header, stage, mb))
            if stage in exits:
                out.append(backward(header, stage, mb))
        return out

    return _per_stage(header, order)


def ee_tuning_with_teacher(pp: int, m: int, exit_stages: Sequence[int]) -> Schedule:
    """EE-Tuning whose exit losses need the final head (self-distillation, the estimator's target).

    1F1B over all stages with targets in place of gradients (``ScheduleHeader.carries_targets``): every
    stage runs its forward (the frozen backbone builds no graph), the last stage computes the final
    head's targets once per microbatch, and the backward messages carry them from the last stage down to
    the first stage holding an exit; each stage on that path runs its B when they arrive -- its deferred
    exit losses (exit parameters only) -- and hands them on. Stages before the first exit stage only run
    forwards (no graph at all). The plan is an ordinary chained route, so ``validate`` / ``simulate``
    check it like any 1F1B."""
    check_sizes(pp, m)
    heads = check_exits(pp, exit_stages, "--tune-exit")
    last = pp - 1
    bwd = tuple(range(min(heads), last + 1))
    routes = tuple(Route(mb, "tune", last, bwd) for mb in range(m))
    header = ScheduleHeader("ee_tuning_with_teacher", pp, 1, m, routes, heads, carries_targets=True)
    return _per_stage(header, lambda s: one_f_one_b_order(header, s, range(m)))


def check_exits(num_positions: int, exits: Sequence[int], needed_by: str | None = None) -> tuple[int, ...]:
    """Validate exit positions (one entry per exit head; the stage when vpp == 1) and return them
    sorted. ``needed_by`` names the flag that requires at least one exit."""
    heads = tuple(sorted(exits))
    if needed_by and not heads:
        raise ScheduleError(f"{needed_by} needs at least one early exit (--exit-layer-nums)")
    if heads and (heads[0] < 0 or heads[-1] >= num_positions):
        raise ScheduleError(
            f"exit positions {list(heads)} must lie in 0..{num_positions - 1} "
            f"(--exit-layer-nums vs pipeline and virtual pipeline sizes)"
        )
    return heads
