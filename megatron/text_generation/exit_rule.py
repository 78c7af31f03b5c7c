"""The one early-exit rule, shared by decoding and teacher-forced scoring.

:class:`ExitRule` says which exits may fire (``allowed``: a request's ``exit_layers``, all by default),
which exits must be computed for that (``computed``: the allowed ones, plus the exits below the last
allowed one when the measure compares with the previous exit, as CALM's cosine does), the confidence
measure (``confidence.MEASURE_RULES``), the threshold (constant, or CALM's decaying one), the exits'
temperatures (applied to the confidence only) and an optional estimator floor: with one, a row's measure
is taken only where the exit's learned estimate reaches the floor (elsewhere its confidence is -1: such a
row does not leave there, whatever the threshold), so an
expensive measure (the exit's projection and softmax) runs only where the cheap estimator sees a chance.

:class:`ExitWalk` applies it to a set of rows walking up the exits in layer order: for generation the
sequences of one decoding step (the walk's state travels between pipeline stages in the step's carry),
for scoring every position of a batch. At each computed exit a row leaves when its confidence reaches
the bar and it has not left before; rows that have all decided stop the walk from asking for anything,
so an exit's logits are computed only when a measure or a token choice needs them.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch

from .confidence import MEASURE_RULES, check_measure, decayed_threshold, estimate

__all__ = ["ExitRule", "ExitWalk"]


class ExitRule:
    """``exits``: the model's exit layers; ``allowed``: those that may fire (None / empty: all);
    ``threshold`` in [0, 1]; ``decay``: CALM's tau (None / 0: a constant threshold); ``temperature(layer)``:
    divides the exit's logits for the confidence (None: 1); ``estimator_floor`` in [0, 1]: see the module doc
    (None: off)."""

    def __init__(self, exits: Sequence[int], *, allowed: Iterable[int] | None = None, measure: str = "top1",
                 threshold: float = 1.0, decay: float | None = None,
                 temperature: Callable[[int], float] | None = None, estimator_floor: float | None = None):
        exits = sorted(exits)
        allowed = sorted(set(allowed or exits))
        unknown = sorted(set(allowed) - set(exits))
        if unknown:
            raise ValueError(f"exit_layers {unknown} are not exits of this model (exits: {exits})")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"early_exit_thres must lie in [0, 1], got {threshold}")
        if decay is not None and not (math.isfinite(decay) and decay >= 0):
            raise ValueError(f"early_exit.threshold_decay must be a finite number >= 0 (CALM's decay temperature; "
                             f"None or 0 keeps the threshold constant), got {decay}")
        self.measure = MEASURE_RULES[check_measure(measure)]
        self.exits, self.allowed = exits, frozenset(allowed)
        last = max(allowed, default=0)
        self.computed = frozenset(e for e in exits if e <= last) if self.measure.compares else self.allowed
        self.threshold, self.decay = threshold, float(decay or 0.0)
        self.temperature = temperature
        if estimator_floor is not None and not 0.0 <= estimator_floor <= 1.0:
            raise ValueError(f"estimator_floor must lie in [0, 1] (or be None), got {estimator_floor}")
        self.estimator_floor = estimator_floor

    def bar(self, position: torch.Tensor | None = None, max_len: int = 1) -> float | torch.Tensor:
        """The threshold for each row; with a decay, ``position`` ``[rows]`` is each row's index among the
        generated tokens and ``max_len`` the generation budget (CALM's eq. 5)."""
        if not self.decay or position is None:
            return self.threshold
        return decayed_threshold(self.threshold, position, max_len, self.decay)

    def confidence(self, view, prev_hidden: torch.Tensor | None) -> torch.Tensor:
        temperature = self.temperature(view.layer) if self.temperature is not None else 1.0
        if self.estimator_floor is None:
            return self.measure.score(view, prev_hidden, temperature)
        passed = estimate(view) >= self.estimator_floor
        if not bool(passed.any()):  # the common case at batch 1: no projection at all
            return torch.full((view.rows,), -1.0, dtype=torch.float32, device=passed.device)
        return torch.where(passed, self.measure.score(view, prev_hidden, temperature), -1.0)


class ExitWalk:
    """One set of rows walking up the exits under ``rule``. ``decided`` ``[rows]`` bool: rows whose token
    is settled already (left at an exit, or not needed); ``prev_hidden``: the hidden state at the last
    computed exit (carried across pipeline stages); ``bar``: the threshold (a float or ``[rows]``)."""

    def __init__(self, rule: ExitRule, decided: torch.Tensor, prev_hidden: torch.Tensor | None = None,
                 bar: float | torch.Tensor | None = None):
        self.rule, self.decided, self.prev_hidden = rule, decided, prev_hidden
        self.bar = rule.threshold if bar is None else bar
        self.last_confidence: torch.Tensor | None = None  # of the last exit that was scored

    def visit(self, view) -> torch.Tensor | None:
        """The rows leaving at ``view``'s exit (``[rows]`` bool), or None where no row can leave there."""
        rule, layer = self.rule, view.layer
        self.last_confidence = None
        if layer not in rule.computed:
            return None
        prev = self.prev_hidden
        if rule.measure.compares:
            self.prev_hidden = view.hidden
        if layer not in rule.allowed:
            return None
        conf = self.last_confidence = rule.confidence(view, prev)
        fire = (conf >= self.bar) & ~self.decided
        self.decided = self.decided | fire
        return fire
