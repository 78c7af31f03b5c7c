"""ASCII picture of a simulated schedule: one row per stage, time to the right.

Each compute span is drawn as ``<letter><mb>`` padded to its length and closed by ``|``; idle time is
``.``. Letters: ``F`` forward, ``f`` forward without autograd, ``B`` backward, ``E`` backward seeded by
exit losses only, ``T`` truncated backward, ``S`` gradient-sync launch. Chunks > 0 are shown as
``<letter><mb>c<chunk>``. Fill microbatches are the ids listed under the grid.
"""

from __future__ import annotations

from .actions import ActionKind, ScheduleHeader
from .simulate import SimResult

__all__ = ["ascii_grid", "LETTERS"]

LETTERS = {
    ActionKind.F: "F",
    ActionKind.F_NOGRAD: "f",
    ActionKind.B: "B",
    ActionKind.B_EXIT: "E",
    ActionKind.B_TRUNC: "T",
    ActionKind.GRAD_SYNC: "S",
}


def _label(action) -> str:
    label = LETTERS[action.kind] + ("" if action.mb < 0 else str(action.mb))
    return label + (f"c{action.chunk}" if action.chunk else "")


def _quantum(times: list[float], floor: float) -> float:
    """Largest step dividing every time (within 1e-6), but not below ``floor`` (then: rounding)."""
    q = 0.0
    for t in times:
        a, b = max(q, t), min(q, t)
        while b > 1e-6 and a / b < 1e9:
            a, b = b, a - b * (a // b)
        q = a
    return max(q, floor)


def ascii_grid(result: SimResult, header: ScheduleHeader, max_width: int = 400) -> str:
    """Render ``result``: the time quantum divides every span boundary when the row stays within
    ``max_width`` characters; a cell per quantum is wide enough for the longest label."""
    spans = [sp for s in result.timeline for sp in result.compute_spans(s) if sp.end > sp.start]
    if not spans:
        return "(empty schedule)"
    cell = max(len(_label(sp.action)) for sp in spans) + 1
    quantum = _quantum([t for sp in spans for t in (sp.start, sp.end)], result.makespan * cell / max_width)
    width = round(result.makespan / quantum) * cell
    rows = []
    for stage in sorted(result.timeline):
        line = ["."] * width
        for sp in result.compute_spans(stage):
            a, b = round(sp.start / quantum) * cell, round(sp.end / quantum) * cell
            if b <= a:
                continue
            text = (_label(sp.action)[: b - a - 1]).ljust(b - a - 1) + "|"
            line[a:b] = list(text)
        rows.append(f"stage {stage:>2} " + "".join(line))
    notes = [f"time quantum {quantum:g} per {cell} chars; makespan {result.makespan:g}; "
             f"bubble fraction {result.bubble_fraction:.3f}"]
    if header.fill_warmup:
        notes.append("warm-up fills (mb, deepest stage): " + ", ".join(map(str, header.fill_warmup)))
    if header.fill_cooldown:
        notes.append("cool-down fills (mb, first stage of backward): " + ", ".join(map(str, header.fill_cooldown)))
    return "\n".join(rows + notes)
