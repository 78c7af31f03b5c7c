"""Learning-rate and weight-decay schedules (Megatron's ``OptimizerParamScheduler``).

Both values are pure functions of ``num_steps``, the number of consumed training samples (Megatron counts
``global_batch_size`` per successful iteration; skipped iterations do not advance it). Resuming restores
``num_steps`` and recomputes them, so a resumed run follows the same curve.

Learning rate: a linear warm-up from ``init_lr`` to ``max_lr`` over ``warmup_steps``, then ``constant``,
``linear`` or ``cosine`` decay to ``min_lr`` at ``decay_steps`` (``min_lr`` afterwards), or
``inverse-square-root`` (``max_lr * sqrt(max(warmup, 1) / max(step, 1))``, floored at ``min_lr``).
Weight decay: constant, or growing ``linear``ly / ``cosine``-shaped from ``start_wd`` to ``end_wd`` over
``wd_incr_steps``. Each optimizer group receives ``lr * lr_mult`` and ``wd * wd_mult``.

Checkpoints hold :meth:`OptimizerParamScheduler.state_dict`, plain numbers and strings: no pickle names
this module, so checkpoints written while it was ``megatron/optimizer_param_scheduler.py`` load unchanged.
"""

from __future__ import annotations

import math

from megatron.errors import ConfigError

__all__ = ["OptimizerParamScheduler", "scheduler_steps", "build_scheduler"]

_STATE_KEYS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style",
               "start_wd", "end_wd", "wd_incr_steps", "wd_incr_style")


class OptimizerParamScheduler:
    """Sets ``lr`` and ``weight_decay`` of ``optimizer.param_groups`` (any object with that attribute)."""

    def __init__(self, optimizer, init_lr: float, max_lr: float, min_lr: float, lr_warmup_steps: float,
                 lr_decay_steps: float, lr_decay_style: str, start_wd: float, end_wd: float,
                 wd_incr_steps: float, wd_incr_style: str, use_checkpoint_opt_param_scheduler: bool = False,
                 override_opt_param_scheduler: bool = False):
        if override_opt_param_scheduler and use_checkpoint_opt_param_scheduler:
            raise ConfigError("--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler are "
                              "exclusive: keep the command-line values or the checkpoint's, not both")
        self.optimizer = optimizer
        self.init_lr, self.max_lr, self.min_lr = float(init_lr), float(max_lr), float(min_lr)
        self.lr_warmup_steps, self.lr_decay_steps = lr_warmup_steps, lr_decay_steps
        self.lr_decay_style = lr_decay_style
        self.start_wd, self.end_wd = float(start_wd), float(end_wd)
        self.wd_incr_steps, self.wd_incr_style = wd_incr_steps, wd_incr_style
        self.use_checkpoint = use_checkpoint_opt_param_scheduler
        self.override = override_opt_param_scheduler
        self._check()
        self.num_steps = 0
        self.step(0)

    def _check(self) -> None:
        if not 0.0 <= self.min_lr <= self.max_lr:
            raise ConfigError(f"need 0 <= --min-lr ({self.min_lr}) <= --lr ({self.max_lr})")
        if self.lr_decay_steps <= 0:
            raise ConfigError(f"lr decay length must be > 0 (--lr-decay-iters/--lr-decay-samples or the training "
                              f"length), got {self.lr_decay_steps} samples")
        if not 0 <= self.lr_warmup_steps < self.lr_decay_steps:
            raise ConfigError(f"lr warm-up ({self.lr_warmup_steps} samples) must be shorter than the decay "
                              f"({self.lr_decay_steps} samples): lower --lr-warmup-iters/-samples/-fraction")
        if self.lr_decay_style not in ("constant", "linear", "cosine", "inverse-square-root"):
            raise ConfigError(f"--lr-decay-style {self.lr_decay_style!r} is not one of constant, linear, cosine, "
                              "inverse-square-root")
        if self.wd_incr_style not in ("constant", "linear", "cosine"):
            raise ConfigError(f"--weight-decay-incr-style {self.wd_incr_style!r} is not one of constant, linear, "
                              "cosine")
        if not 0.0 <= self.start_wd <= self.end_wd:
            raise ConfigError(f"need 0 <= --start-weight-decay ({self.start_wd}) <= --end-weight-decay "
                              f"({self.end_wd})")
        if self.wd_incr_style == "constant" and self.start_wd != self.end_wd:
            raise ConfigError("a constant --weight-decay-incr-style needs --start-weight-decay == "
                              "--end-weight-decay")
        if self.wd_incr_style != "constant" and self.wd_incr_steps <= 0:
            raise ConfigError(f"weight-decay increment length must be > 0, got {self.wd_incr_steps}")

    def get_wd(self) -> float:
        if self.num_steps > self.wd_incr_steps or self.wd_incr_style == "constant":
            return self.end_wd
        ratio = self.num_steps / self.wd_incr_steps
        coeff = ratio if self.wd_incr_style == "linear" else 0.5 * (math.cos(math.pi * (1 - ratio)) + 1.0)
        return self.start_wd + coeff * (self.end_wd - self.start_wd)

    def get_lr(self) -> float:
        step = self.num_steps
        if self.lr_warmup_steps > 0 and step <= self.lr_warmup_steps:
            return self.init_lr + (self.max_lr - self.init_lr) * step / self.lr_warmup_steps
        if self.lr_decay_style == "constant":
            return self.max_lr
        if step > self.lr_decay_steps:
            return self.min_lr
        if self.lr_decay_style == "inverse-square-root":
            lr = self.max_lr * math.sqrt(max(self.lr_warmup_steps, 1)) / math.sqrt(max(step, 1))
            return max(self.min_lr, lr)
        ratio = (step - self.lr_warmup_steps) / (self.lr_decay_steps - self.lr_warmup_steps)
        coeff = 1.0 - ratio if self.lr_decay_style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def step(self, increment: int) -> None:
        """Advance by ``increment`` consumed samples and write the new values into the optimizer groups."""
        self.num_steps += increment
        lr, wd = self.get_lr(), self.get_wd()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = wd * group.get("wd_mult", 1.0)

    def state_dict(self) -> dict:
        state = {key: getattr(self, key) for key in _STATE_KEYS}
        state["num_steps"] = self.num_steps
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore ``num_steps``; the schedule's shape comes from the command line with
        ``--override-opt-param-scheduler``, from the checkpoint with ``--use-checkpoint-opt-param-scheduler``,
        and must otherwise agree between the two."""
        for key in _STATE_KEYS:
            if key not in state:
                continue
            mine, saved = getattr(self, key), state[key]
            if self.override:
                continue
            if self.use_checkpoint:
                setattr(self, key, saved)
            elif mine != saved:
                raise ConfigError(
                    f"optimizer scheduler value {key}: command line {mine!r} != checkpoint {saved!r}; pass "
                    "--override-opt-param-scheduler to keep the command line or "
                    "--use-checkpoint-opt-param-scheduler to keep the checkpoint"
                )
        self._check()
        self.num_steps = 0
        self.step(int(state["num_steps"]))


def scheduler_steps(config, train_iters: int | None, train_samples: int | None,
                    global_batch_size: int) -> tuple[float, float, float]:
    """``(lr_warmup_steps, lr_decay_steps, wd_incr_steps)`` in samples, from iteration- or sample-based flags
    (Megatron's rules: decay defaults to the whole run; a warm-up fraction is of the decay length)."""
    config.validate_schedule(train_iters, train_samples)
    if train_iters is not None:
        decay = (config.lr_decay_iters if config.lr_decay_iters is not None else train_iters) * global_batch_size
        wd_incr = train_iters * global_batch_size
        warmup = config.lr_warmup_iters * global_batch_size
    else:
        decay = config.lr_decay_samples if config.lr_decay_samples is not None else train_samples
        wd_incr = train_samples
        warmup = config.lr_warmup_samples
    if config.lr_warmup_fraction is not None:
        warmup = config.lr_warmup_fraction * decay
    return warmup, decay, wd_incr


def build_scheduler(optimizer, config, train_iters: int | None, train_samples: int | None,
                    global_batch_size: int) -> OptimizerParamScheduler:
    """The scheduler for an :class:`~megatron.optimizer.config.OptimizerConfig`; call ``step(global_batch_size)``
    after every successful iteration."""
    warmup, decay, wd_incr = scheduler_steps(config, train_iters, train_samples, global_batch_size)
    start_wd, end_wd = config.wd_range
    return OptimizerParamScheduler(
        optimizer, init_lr=config.lr_warmup_init, max_lr=config.lr, min_lr=config.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=decay, lr_decay_style=config.lr_decay_style,
        start_wd=start_wd, end_wd=end_wd, wd_incr_steps=wd_incr, wd_incr_style=config.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=config.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=config.override_opt_param_scheduler,
    )
