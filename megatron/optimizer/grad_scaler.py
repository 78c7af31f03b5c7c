"""Loss scaling for fp16 (and optionally bf16) training: a static scale or Megatron's dynamic scaler.

The training loop multiplies the loss (final and exit losses alike) by ``scale``; the optimizer divides
the gradients by it and reports whether any was inf/nan, then calls :meth:`update`.

Dynamic semantics (Megatron's): on an overflow the growth counter resets and the hysteresis counter drops
by one; once it reaches zero the scale is multiplied by ``backoff_factor`` (never below ``min_scale``),
and every further overflow backs off again until a clean window. After ``growth_interval`` consecutive
clean steps the scale is multiplied by ``growth_factor`` and the hysteresis budget is refilled.
"""

from __future__ import annotations

from megatron.errors import ConfigError

__all__ = ["ConstantGradScaler", "DynamicGradScaler", "GradScaler", "build_grad_scaler"]


class ConstantGradScaler:
    """A fixed loss scale (``--loss-scale``)."""

    def __init__(self, scale: float):
        if scale <= 0:
            raise ConfigError(f"--loss-scale must be > 0, got {scale}")
        self.scale = float(scale)

    @property
    def inv_scale(self) -> float:
        return 1.0 / self.scale

    def update(self, found_inf: bool) -> None:
        """A static scale never changes."""

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        """The scale comes from the command line, not the checkpoint (Megatron's behaviour)."""


class DynamicGradScaler:
    """Megatron's dynamic loss scaler (``--initial-loss-scale``, ``--min-loss-scale``,
    ``--loss-scale-window``, ``--hysteresis``)."""

    def __init__(self, initial_scale: float = 2.0**32, min_scale: float = 1.0, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 1000, hysteresis: int = 2):
        if not 0 < min_scale <= initial_scale:
            raise ConfigError(f"need 0 < --min-loss-scale ({min_scale}) <= --initial-loss-scale ({initial_scale})")
        if growth_factor <= 1 or not 0 < backoff_factor < 1:
            raise ValueError(f"growth factor must be > 1 and backoff in (0, 1), got {growth_factor}, {backoff_factor}")
        if growth_interval < 1 or hysteresis < 1:
            raise ConfigError(f"--loss-scale-window ({growth_interval}) and --hysteresis ({hysteresis}) must be >= 1")
        self.scale = float(initial_scale)
        self.min_scale = float(min_scale)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval, self.hysteresis = growth_interval, hysteresis
        self.growth_tracker = 0
        self.hysteresis_tracker = hysteresis

    @property
    def inv_scale(self) -> float:
        return 1.0 / self.scale

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            self.growth_tracker = 0
            self.hysteresis_tracker = self.hysteresis
            self.scale *= self.growth_factor

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker,
                "hysteresis_tracker": self.hysteresis_tracker}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.hysteresis_tracker = int(state["hysteresis_tracker"])


GradScaler = ConstantGradScaler | DynamicGradScaler


def build_grad_scaler(config) -> GradScaler | None:
    """``--loss-scale`` gives a static scaler (fp16 or bf16); fp16 without it a dynamic one; otherwise none
    (bf16 and fp32 need no scaling). ``config`` is an :class:`~megatron.optimizer.config.OptimizerConfig`."""
    if not (config.fp16 or config.bf16):
        return None
    if config.loss_scale is not None:
        return ConstantGradScaler(config.loss_scale)
    if config.fp16:
        return DynamicGradScaler(config.initial_loss_scale, config.min_loss_scale, 2.0, 0.5,
                                 config.loss_scale_window, config.hysteresis)
    return None
