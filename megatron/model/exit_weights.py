"""The exit-loss weight warm-up schedule of EE-LLM (``--exit-layer-weight-warmup-*``), as pure functions.

``iteration`` is the 0-based count of completed iterations, so the first step uses the initial weight;
from ``warmup_iters`` on the weight is the target. The initial weight may exceed the target (a
cool-down). Resuming recomputes the weight from the restored iteration: no state to save.
"""

from __future__ import annotations

import math

__all__ = ["exit_weight", "exit_weights"]


def exit_weight(iteration: int, target: float, init: float = 0.0, warmup_iters: int = 0, style: str = "linear") -> float:
    """Weight of one exit at ``iteration``: ``init`` + progress x (``target`` - ``init``)."""
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    if warmup_iters < 0:
        raise ValueError(f"--exit-layer-weight-warmup-iters must be >= 0, got {warmup_iters}")
    if warmup_iters == 0 or iteration >= warmup_iters:
        return float(target)
    rho = iteration / warmup_iters
    if style == "linear":
        progress = rho
    elif style == "cosine":
        progress = (1.0 - math.cos(math.pi * rho)) / 2.0
    else:
        raise ValueError(f"--exit-layer-weight-warmup-style must be linear or cosine, got {style!r}")
    return init + progress * (target - init)


def exit_weights(iteration: int, ee) -> dict[int, float]:
    """Weight of every exit of an :class:`~megatron.config.EarlyExitConfig`, by exit layer number."""
    return {
        layer: exit_weight(iteration, target, init, ee.exit_layer_weight_warmup_iters, ee.exit_layer_weight_warmup_style)
        for layer, target, init in zip(ee.exit_layer_nums, ee.weights, ee.weight_inits)
    }
