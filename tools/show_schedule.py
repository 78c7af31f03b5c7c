#!/usr/bin/env python
"""Show a pipeline schedule: ASCII grid on stdout, makespan and bubble fraction, optional PNG timeline.

Takes the training flags' names, so a launch script's values can be pasted in::

    python tools/show_schedule.py --pipeline-model-parallel-size 4 --num-layers 8 \\
        --exit-layer-nums 2 4 --fill-explicit-bubbles --num-microbatches 8 --output fill.png

Time unit: the forward of one transformer layer; a chunk's backward costs ``--backward-forward-ratio``
times its forward, and each exit head adds ``--exit-forward-cost`` (and R times that in backward).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.cli_errors import run_cli  # noqa: E402
from megatron.core.pipeline_parallel.schedules import (  # noqa: E402
    ActionKind,
    Costs,
    Schedule,
    ScheduleError,
    SimResult,
    ascii_grid,
    simulate,
    validate,
)
from megatron.model.partition import partition  # noqa: E402
from megatron.training.forward_backward import ScheduleOptions, build_schedule  # noqa: E402

COLOURS = {
    "forward": "#4C72B0",
    "backward": "#55A868",
    "forward, no autograd": "#A6B8D8",
    "warm-up fill forward": "#F0A860",
    "warm-up fill backward (from exits)": "#C44E52",
    "cool-down fill forward": "#D9C7F0",
    "cool-down fill backward (truncated)": "#8172B2",
    "exit-only backward (EE-Tuning)": "#DD8452",
    "gradient sync": "#222222",
}
IDLE = "#F3D9D9"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=4)
    p.add_argument("--num-layers", type=int, default=None, help="default: 2 per stage")
    p.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    p.add_argument("--exit-layer-nums", type=int, nargs="*", default=[], help="1-based exit layers")
    p.add_argument("--fill-explicit-bubbles", action="store_true")
    p.add_argument("--num-fill-warmup-microbatches", type=int, default=None)
    p.add_argument("--num-fill-cooldown-microbatches", type=int, default=None)
    p.add_argument("--backward-forward-ratio", type=float, default=2.0)
    p.add_argument("--num-microbatches", type=int, default=8)
    p.add_argument("--tune-exit", action="store_true", help="EE-Tuning stream")
    p.add_argument("--forward-only", action="store_true", help="evaluation schedule")
    p.add_argument("--exit-forward-cost", type=float, default=0.0,
                   help="forward cost of one exit head, in layer-forward units")
    p.add_argument("--output", type=str, default=None, help="write a PNG timeline here")
    return p.parse_args(argv)


def layout(args: argparse.Namespace) -> tuple[int, int, list[int]]:
    """(vpp, layers per chunk, exit position of each exit) from the layer flags."""
    pp = args.pipeline_model_parallel_size
    if pp < 1:
        raise ScheduleError("--pipeline-model-parallel-size must be >= 1")
    n = args.num_layers if args.num_layers is not None else 2 * pp
    if n < 1 or n % pp:
        raise ScheduleError(f"--num-layers ({n}) must be a positive multiple of --pipeline-model-parallel-size ({pp})")
    per_chunk = args.num_layers_per_virtual_pipeline_stage or n // pp
    if per_chunk < 1 or (n // pp) % per_chunk:
        raise ScheduleError(
            f"--num-layers-per-virtual-pipeline-stage ({per_chunk}) must divide the layers per stage ({n // pp})"
        )
    bad = [x for x in args.exit_layer_nums if not 1 <= x <= n]
    if bad:
        raise ScheduleError(f"--exit-layer-nums {bad} outside 1..{n} (--num-layers)")
    vpp = n // pp // per_chunk
    return vpp, per_chunk, partition(n, pp, vpp, sorted(set(args.exit_layer_nums))).exit_positions


def build(args: argparse.Namespace) -> tuple[Schedule, Costs, Schedule | None]:
    """The requested schedule, chosen where training chooses it (``build_schedule``), its cost model, and
    plain 1F1B for comparison when filling."""
    pp, m, ratio = args.pipeline_model_parallel_size, args.num_microbatches, args.backward_forward_ratio
    vpp, per_chunk, exits = layout(args)
    costs = Costs(forward=per_chunk, backward=ratio * per_chunk,
                  exit_forward=args.exit_forward_cost, exit_backward=ratio * args.exit_forward_cost)
    opts = ScheduleOptions(args.fill_explicit_bubbles, args.num_fill_warmup_microbatches,
                           args.num_fill_cooldown_microbatches, ratio, args.tune_exit)
    schedule = build_schedule(pp, vpp, m, exits, opts, evaluation=args.forward_only, costs=costs)
    filled = args.fill_explicit_bubbles and not args.forward_only
    baseline = build_schedule(pp, vpp, m, exits, ScheduleOptions(backward_forward_ratio=ratio)) if filled else None
    return schedule, costs, baseline


def category(schedule: Schedule, kind: ActionKind, mb: int) -> str:
    if kind is ActionKind.GRAD_SYNC:
        return "gradient sync"
    role = schedule.header.routes[mb].role
    is_fwd = kind in (ActionKind.F, ActionKind.F_NOGRAD)
    if role == "warmup_fill":
        return "warm-up fill forward" if is_fwd else "warm-up fill backward (from exits)"
    if role == "cooldown_fill":
        return "cool-down fill forward" if is_fwd else "cool-down fill backward (truncated)"
    if kind is ActionKind.B_EXIT:
        return "exit-only backward (EE-Tuning)"
    if kind is ActionKind.F_NOGRAD:
        return "forward, no autograd"
    return "forward" if is_fwd else "backward"


def draw(schedule: Schedule, result: SimResult, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        raise SystemExit("--output needs matplotlib: pip install matplotlib") from None
    h = schedule.header
    stages = sorted(result.timeline)
    fig, ax = plt.subplots(figsize=(min(4 + result.makespan * 0.12, 40), 1.2 + 0.55 * len(stages)))
    used = set()
    for row, stage in enumerate(stages):
        y = len(stages) - 1 - row
        ax.broken_barh([(0, result.makespan)], (y - 0.4, 0.8), facecolors=IDLE)
        for sp in result.compute_spans(stage):
            cat = category(schedule, sp.action.kind, sp.action.mb)
            used.add(cat) if sp.end > sp.start else None
            ax.broken_barh([(sp.start, sp.end - sp.start)], (y - 0.4, 0.8), facecolors=COLOURS[cat],
                           edgecolors="white", linewidth=0.6)
            if sp.action.mb >= 0 and sp.end - sp.start >= 0.9:
                label = str(sp.action.mb) + (f"c{sp.action.chunk}" if h.vpp > 1 else "")
                ax.text((sp.start + sp.end) / 2, y, label, ha="center", va="center", fontsize=7, color="black")
    ax.set_yticks(range(len(stages)), [f"stage {s}" for s in reversed(stages)])
    ax.set_xlim(0, result.makespan)
    ax.set_xlabel("time (forward of one layer = 1)")
    ax.set_title(f"{h.name}: pp={h.pp} vpp={h.vpp} m={h.num_microbatches} exits at positions "
                 f"{list(h.exit_positions)}; makespan {result.makespan:g}, bubble {result.bubble_fraction:.1%}")
    handles = [Patch(color=COLOURS[c], label=c) for c in COLOURS if c in used]
    handles.append(Patch(color=IDLE, label="idle (bubble)"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=4, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        schedule, costs, baseline = build(args)
        validate(schedule)
    except ScheduleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = simulate(schedule, costs)
    print(ascii_grid(result, schedule.header))
    print(f"makespan: {result.makespan:g}  bubble fraction: {result.bubble_fraction:.4f}")
    print("idle per stage: " + ", ".join(f"{s}: {result.idle[s]:g}" for s in sorted(result.idle)))
    if baseline is not None:
        base = simulate(baseline, costs)
        print(f"plain 1F1B for comparison: makespan {base.makespan:g}  bubble fraction {base.bubble_fraction:.4f}")
    if args.output:
        draw(schedule, result, args.output)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
