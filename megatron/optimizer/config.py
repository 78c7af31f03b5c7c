"""The optimizer / mixed-precision / learning-rate configuration section and its validation.

Field names are Megatron's ``args`` attribute names (``--lr`` -> ``lr``, ``--lr-warmup-iters`` ->
``lr_warmup_iters`` ...), defaults are Megatron's. :meth:`OptimizerConfig.validate` checks the section on
its own; :meth:`OptimizerConfig.validate_schedule` checks it against iteration- or sample-based training.
Both run before any tensor or process group exists and raise :class:`~megatron.errors.ConfigError`
naming the flag and the fix; :meth:`OptimizerConfig.validate_precision` is the part every run needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron.errors import require

__all__ = ["OptimizerConfig", "LR_DECAY_STYLES", "WD_INCR_STYLES"]

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
WD_INCR_STYLES = ("constant", "linear", "cosine")


@dataclass
class OptimizerConfig:
    """Megatron's optimizer, mixed-precision, learning-rate and regularization flags."""

    optimizer: str = "adam"  # adam (decoupled weight decay, AdamW) | sgd
    lr: float | None = None  # peak learning rate
    min_lr: float = 0.0  # learning rate at the end of the decay
    lr_decay_style: str = "linear"  # constant | linear | cosine | inverse-square-root
    lr_decay_iters: int | None = None  # decay length in iterations; None: train_iters
    lr_decay_samples: int | None = None  # decay length in samples; None: train_samples
    lr_warmup_fraction: float | None = None  # warm-up as a fraction of the decay length
    lr_warmup_iters: int = 0  # warm-up length in iterations
    lr_warmup_samples: int = 0  # warm-up length in samples
    lr_warmup_init: float = 0.0  # learning rate at the start of the warm-up
    override_opt_param_scheduler: bool = False  # on load, keep this run's schedule flags over the checkpoint's
    use_checkpoint_opt_param_scheduler: bool = False  # on load, take the schedule flags from the checkpoint
    weight_decay: float = 0.01  # decoupled weight decay (constant style)
    start_weight_decay: float | None = None  # weight decay at the start of a linear / cosine increment
    end_weight_decay: float | None = None  # weight decay at the end of the increment
    weight_decay_incr_style: str = "constant"  # constant | linear | cosine
    clip_grad: float = 1.0  # clip the global gradient L2 norm to this (0: no clipping)
    adam_beta1: float = 0.9  # Adam's first-moment decay
    adam_beta2: float = 0.999  # Adam's second-moment decay
    adam_eps: float = 1e-8  # Adam's denominator epsilon
    sgd_momentum: float = 0.9  # SGD's momentum
    fp16: bool = False  # fp16 parameters with fp32 master weights and loss scaling
    bf16: bool = False  # bf16 parameters with fp32 master weights
    loss_scale: float | None = None  # static loss scale; None: dynamic for fp16, none for bf16
    initial_loss_scale: float = 2.0**32  # the dynamic loss scale's start
    min_loss_scale: float = 1.0  # the dynamic loss scale's floor
    loss_scale_window: int = 1000  # good steps before the dynamic loss scale grows
    hysteresis: int = 2  # overflowing steps tolerated before the dynamic loss scale shrinks
    use_distributed_optimizer: bool = False  # shard the optimizer state over the data-parallel ranks
    accumulate_allreduce_grads_in_fp32: bool = False  # gradients accumulated and reduced in fp32
    log_num_zeros_in_grad: bool = False  # count zero gradient entries (shown on the console line)

    @property
    def main_grad_dtype(self) -> torch.dtype | None:
        """``grad_dtype`` for the gradient buffers: fp32 with ``--accumulate-allreduce-grads-in-fp32`` and always
        with ``--bf16`` (Megatron forces it: bf16 sums lose too much); ``None`` keeps each parameter's dtype."""
        return torch.float32 if self.accumulate_allreduce_grads_in_fp32 or self.bf16 else None

    @property
    def wd_range(self) -> tuple[float, float]:
        """``(start, end)`` weight decay: both ``--weight-decay`` unless an increment style is set."""
        if self.weight_decay_incr_style == "constant":
            return self.weight_decay, self.weight_decay
        return self.start_weight_decay, self.end_weight_decay

    def validate(self) -> "OptimizerConfig":
        """Check the section on its own; return self."""
        require(self.optimizer in ("adam", "sgd"), f"--optimizer must be adam or sgd, got {self.optimizer!r}")
        require(self.lr is not None, "--lr is required: give the peak learning rate, e.g. --lr 3e-4")
        require(self.min_lr >= 0, f"--min-lr must be >= 0, got {self.min_lr}")
        require(self.lr >= self.min_lr, f"--lr ({self.lr}) must be >= --min-lr ({self.min_lr})")
        require(self.lr_warmup_init >= 0, f"--lr-warmup-init must be >= 0, got {self.lr_warmup_init}")
        require(self.lr_decay_style in LR_DECAY_STYLES,
                 f"--lr-decay-style must be one of {', '.join(LR_DECAY_STYLES)}, got {self.lr_decay_style!r}")
        if self.lr_warmup_fraction is not None:
            require(0.0 <= self.lr_warmup_fraction < 1.0,
                     f"--lr-warmup-fraction must be in [0, 1), got {self.lr_warmup_fraction}")
            require(self.lr_warmup_iters == 0 and self.lr_warmup_samples == 0,
                     "--lr-warmup-fraction cannot be combined with --lr-warmup-iters / --lr-warmup-samples; "
                     "give only one of them")
        require(self.lr_warmup_iters >= 0 and self.lr_warmup_samples >= 0,
                 "--lr-warmup-iters and --lr-warmup-samples must be >= 0")
        self._validate_weight_decay()
        require(self.clip_grad >= 0, f"--clip-grad must be >= 0 (0 disables clipping), got {self.clip_grad}")
        require(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1,
                 f"--adam-beta1 / --adam-beta2 must be in [0, 1), got {self.adam_beta1}, {self.adam_beta2}")
        require(self.adam_eps > 0, f"--adam-eps must be > 0, got {self.adam_eps}")
        require(self.sgd_momentum >= 0, f"--sgd-momentum must be >= 0, got {self.sgd_momentum}")
        self._validate_loss_scaling()
        return self

    def _validate_weight_decay(self) -> None:
        style = self.weight_decay_incr_style
        require(style in WD_INCR_STYLES,
                 f"--weight-decay-incr-style must be one of {', '.join(WD_INCR_STYLES)}, got {style!r}")
        require(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        if style == "constant":
            require(self.start_weight_decay is None and self.end_weight_decay is None,
                     "--start-weight-decay / --end-weight-decay need --weight-decay-incr-style linear or "
                     "cosine; with a constant weight decay give only --weight-decay")
            return
        start, end = self.start_weight_decay, self.end_weight_decay
        require(start is not None and end is not None,
                 f"--weight-decay-incr-style {style} needs both --start-weight-decay and --end-weight-decay")
        require(0 <= start <= end,
                 f"need 0 <= --start-weight-decay ({start}) <= --end-weight-decay ({end}): weight decay only grows")

    def validate_precision(self) -> "OptimizerConfig":
        """The one rule every run (training or not) needs: a single parameter dtype."""
        require(not (self.fp16 and self.bf16), "--fp16 and --bf16 are exclusive; pick one")
        return self

    def _validate_loss_scaling(self) -> None:
        self.validate_precision()
        require(self.loss_scale is None or self.loss_scale > 0,
                 f"--loss-scale must be > 0 (omit it for dynamic scaling), got {self.loss_scale}")
        require(self.initial_loss_scale > 0, f"--initial-loss-scale must be > 0, got {self.initial_loss_scale}")
        require(0 < self.min_loss_scale <= self.initial_loss_scale,
                 f"need 0 < --min-loss-scale ({self.min_loss_scale}) <= --initial-loss-scale "
                 f"({self.initial_loss_scale})")
        require(self.loss_scale_window >= 1, f"--loss-scale-window must be >= 1, got {self.loss_scale_window}")
        require(self.hysteresis >= 1, f"--hysteresis must be >= 1, got {self.hysteresis}")

    def validate_schedule(self, train_iters: int | None, train_samples: int | None) -> None:
        """Check the lr schedule against iteration-based (``--train-iters``) or sample-based
        (``--train-samples``) training, as Megatron does: the two styles must not be mixed."""
        require((train_iters is None) != (train_samples is None),
                 "give exactly one of --train-iters and --train-samples")
        if train_iters is not None:
            require(self.lr_decay_samples is None and self.lr_warmup_samples == 0,
                     "--lr-decay-samples / --lr-warmup-samples need sample-based training (--train-samples); "
                     "with --train-iters use --lr-decay-iters / --lr-warmup-iters")
        else:
            require(self.lr_decay_iters is None and self.lr_warmup_iters == 0,
                     "--lr-decay-iters / --lr-warmup-iters need iteration-based training (--train-iters); "
                     "with --train-samples use --lr-decay-samples / --lr-warmup-samples")
