"""Confidence measures for early-exit decisions, and CALM's position-dependent threshold.

A measure maps one exit's logits (and, for ``cosine``, the hidden states of this exit and the previous
one) to a per-sequence confidence, higher meaning "more sure"; a sequence exits when its confidence
reaches the threshold. Every measure lies in [0, 1], so one threshold range serves them all.

- ``top1``: the largest softmax probability (EE-LLM's rule).
- ``margin``: top-1 minus top-2 softmax probability (CALM's "softmax response").
- ``entropy``: ``1 - H(p) / log V``: 1 for a one-hot distribution, 0 for the uniform one.
- ``cosine``: CALM's hidden-state saturation, the cosine similarity between the hidden state at this exit
  and at the previous exit evaluated for the same token (negative values count as 0: no confidence).
  At the first exit there is nothing to compare with and the confidence is 0, so that exit never fires.
- ``estimator``: the exit's learned estimate (``--exit-estimator``, trained during EE-Tuning) of the
  probability that its top-1 token equals the final head's, from the exit layer's trunk state: a
  576 -> 64 -> 1 network on SmolLM2, so an exit check costs almost nothing and the exit's vocabulary
  projection runs only where it fires (CALM's "classifier" measure).

The callers pass logits over the real vocabulary (vocabulary padding sliced off): padded entries would
take probability mass and change ``V`` in the entropy. Entries at ``-inf`` (banned tokens) are fine.

Decision rules read a measure as a :class:`Measure` (:data:`MEASURE_RULES`): a score of an exit's
:class:`~megatron.model.inference.HeadView` that asks the view for its logits only when it needs them
(``cosine`` never does). A new measure (e.g. a learned estimator on the hidden state) is one more entry
there; :data:`MEASURES` lists their names for the request parsers.

Reference for the decaying threshold: Schuster et al., "Confident Adaptive Language Modeling"
(NeurIPS 2022), eq. (5): ``lambda'(lambda, t) = clip_[0,1](9/10 * lambda + 1/10 * exp(-tau * t / N))``,
with ``t`` the decoding step, ``N`` the maximum output length and ``tau`` the decay temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["Measure", "MEASURE_RULES", "MEASURES", "confidence", "estimate", "check_measure", "decayed_threshold"]


@dataclass(frozen=True)
class Measure:
    """``score(view, prev_hidden, temperature) -> [rows]`` float32 in [0, 1]: the confidence of the rows of an
    exit's view; ``prev_hidden`` ``[rows, h]`` is the hidden state at the previous computed exit (or None).
    ``compares``: the score uses ``prev_hidden``, so the exits below the last one that may fire are computed
    too (their hidden states are compared with)."""

    name: str
    score: Callable
    compares: bool = False


def _logit_measure(name: str) -> Measure:
    return Measure(name, lambda view, prev, temperature: confidence(name, view.logits(), temperature=temperature))


MEASURE_RULES: dict[str, Measure] = {
    **{name: _logit_measure(name) for name in ("top1", "margin", "entropy")},
    "cosine": Measure("cosine", lambda view, prev, temperature: _cosine(prev, view.hidden, view.rows,
                                                                          view.hidden.device), compares=True),
    "estimator": Measure("estimator", lambda view, prev, temperature: estimate(view)),
}
MEASURES = tuple(MEASURE_RULES)


def estimate(view) -> torch.Tensor:
    """The learned agreement estimate ``[rows]`` in [0, 1] of an exit's view (its chunk's estimator on the
    view's trunk state); a ValueError when the exit has none."""
    if view.trunk is None or view.chunk is None:
        raise ValueError(f"confidence 'estimator': the view of layer {view.layer} carries no trunk state")
    return torch.sigmoid(view.chunk.exit_estimate(view.layer, view.trunk))


def check_measure(measure: str) -> str:
    """``measure`` if it names a known confidence measure (an entry of :data:`MEASURE_RULES`), else a
    ValueError naming the field."""
    if measure not in MEASURE_RULES:
        raise ValueError(f"confidence: unknown measure {measure!r}; use one of {', '.join(MEASURE_RULES)}")
    return measure


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if not temperature > 0:
        raise ValueError(f"confidence: temperature must be > 0, got {temperature}")
    return torch.softmax(logits.float() / temperature, dim=-1)


def _cosine(prev_hidden: torch.Tensor | None, hidden: torch.Tensor | None, b: int, device) -> torch.Tensor:
    if hidden is None:
        raise ValueError("confidence: the 'cosine' measure needs hidden (this exit's hidden states [b, h])")
    if hidden.dim() != 2 or hidden.shape[0] != b:
        raise ValueError(f"confidence: hidden must be [b, h] with b = {b}, got {tuple(hidden.shape)}")
    if prev_hidden is None:
        return torch.zeros(b, device=device)
    if prev_hidden.shape != hidden.shape:
        raise ValueError(f"confidence: prev_hidden {tuple(prev_hidden.shape)} and hidden {tuple(hidden.shape)} "
                         "must have the same shape")
    return F.cosine_similarity(prev_hidden.float(), hidden.float(), dim=-1).clamp(0.0, 1.0)


def confidence(measure: str, logits: torch.Tensor, *, prev_hidden: torch.Tensor | None = None,
               hidden: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Confidence ``[b]`` (float32, in [0, 1]) of exit ``logits`` ``[b, V]`` under ``measure``.
    ``temperature`` divides the logits first (an exit's training temperature); ``cosine`` ignores it."""
    if measure not in MEASURES:
        raise ValueError(f"confidence: unknown measure {measure!r}; use one of {', '.join(MEASURES)}")
    if logits.dim() != 2:
        raise ValueError(f"confidence: logits must be [b, V], got shape {tuple(logits.shape)}")
    b, vocab = logits.shape
    if measure == "cosine":
        return _cosine(prev_hidden, hidden, b, logits.device)
    p = _probs(logits, temperature)
    if measure == "top1":
        return p.max(dim=-1).values
    if measure == "margin":
        if vocab < 2:
            return torch.ones(b, device=logits.device)
        top = p.topk(2, dim=-1).values
        return top[:, 0] - top[:, 1]
    if vocab < 2:
        return torch.ones(b, device=logits.device)
    # entr(0) = 0, so tokens at -inf logits (probability 0) add nothing instead of 0 * -inf = nan
    h = torch.special.entr(p).sum(dim=-1)
    return (1.0 - h / math.log(vocab)).clamp(0.0, 1.0)


def decayed_threshold(thres, position, max_len: int, decay: float):
    """CALM's eq. (5): ``clip(0.9 * thres + 0.1 * exp(-decay * position / max_len), 0, 1)``.

    ``position``: the 0-based index of the token being generated (an int, or a tensor ``[b]`` when the
    sequences of a batch are at different steps; the result then is a tensor too); ``max_len``: the
    maximum number of generated tokens (``tokens_to_generate``); ``decay``: CALM's tau >= 0. The threshold
    starts at ``0.9 thres + 0.1`` and falls towards ``0.9 thres + 0.1 exp(-decay)`` at the end: early
    tokens, on which the rest of the output depends, need more confidence to exit."""
    if max_len < 1:
        raise ValueError(f"decayed_threshold: max_len must be >= 1 (the generation budget), got {max_len}")
    if decay < 0:
        raise ValueError(f"decayed_threshold: decay (CALM's tau) must be >= 0, got {decay}")
    if isinstance(position, torch.Tensor):
        if bool((position < 0).any()):
            raise ValueError("decayed_threshold: positions must be >= 0")
        value = 0.9 * thres + 0.1 * torch.exp(-decay * position.float() / max_len)
        return value.clamp(0.0, 1.0)
    if position < 0:
        raise ValueError(f"decayed_threshold: position must be >= 0, got {position}")
    return min(1.0, max(0.0, 0.9 * thres + 0.1 * math.exp(-decay * position / max_len)))
