"""Learning-rate / weight-decay schedules against hand-computed values, resume, and config validation."""

import math
import pickle
from types import SimpleNamespace

import pytest

from megatron.config import ConfigError
from megatron.optimizer.config import OptimizerConfig
from megatron.optimizer.optimizer_param_scheduler import OptimizerParamScheduler, build_scheduler, scheduler_steps


def _opt(*mults):
    return SimpleNamespace(param_groups=[{"lr_mult": lm, "wd_mult": wm} for lm, wm in mults or [(1.0, 1.0)]])


def _sched(style="linear", warmup=10, decay=110, max_lr=1.0, min_lr=0.1, init_lr=0.0, wd=(0.1, 0.1),
           wd_style="constant", wd_steps=200, **kw):
    return OptimizerParamScheduler(_opt(), init_lr, max_lr, min_lr, warmup, decay, style, wd[0], wd[1], wd_steps,
                                   wd_style, **kw)


def _lr_at(sched, step):
    sched.num_steps = step
    return sched.get_lr()


@pytest.mark.parametrize("style, step, want", [
    ("linear", 0, 0.0),
    ("linear", 5, 0.5),
    ("linear", 10, 1.0),
    ("linear", 60, 0.1 + 0.9 * 0.5),
    ("linear", 110, 0.1),
    ("linear", 500, 0.1),
    ("cosine", 35, 0.1 + 0.9 * 0.5 * (math.cos(math.pi * 0.25) + 1)),
    ("cosine", 60, 0.1 + 0.9 * 0.5),
    ("cosine", 110, 0.1),
    ("constant", 5, 0.5),
    ("constant", 1000, 1.0),
    ("inverse-square-root", 40, 1.0 * math.sqrt(10) / math.sqrt(40)),
    ("inverse-square-root", 100, max(0.1, math.sqrt(10) / 10)),
    ("inverse-square-root", 111, 0.1),
])
def test_lr_curves_match_formulas(style, step, want):
    assert _lr_at(_sched(style), step) == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_warmup_starts_from_init_lr_and_inverse_sqrt_without_warmup():
    assert _lr_at(_sched(init_lr=0.2), 5) == pytest.approx(0.2 + 0.8 * 0.5)
    s = _sched("inverse-square-root", warmup=0, min_lr=0.0)
    assert _lr_at(s, 0) == 1.0 and _lr_at(s, 4) == pytest.approx(0.5)


@pytest.mark.parametrize("style, step, want", [
    ("linear", 50, 0.1 + 0.25 * 0.4),
    ("cosine", 50, 0.1 + 0.5 * (math.cos(math.pi * 0.75) + 1) * 0.4),
    ("cosine", 100, 0.3),
    ("linear", 300, 0.5),
])
def test_weight_decay_increments(style, step, want):
    s = _sched(wd=(0.1, 0.5), wd_style=style, wd_steps=200)
    s.num_steps = step
    assert s.get_wd() == pytest.approx(want)


def test_step_writes_multiplied_values_into_groups():
    opt = _opt((1.0, 1.0), (2.0, 0.0))
    s = OptimizerParamScheduler(opt, 0.0, 1.0, 0.0, 10, 110, "linear", 0.1, 0.1, 100, "constant")
    s.step(5)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 1.0]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_resume_recomputes_and_mismatch_is_refused():
    a = _sched("cosine")
    for _ in range(7):
        a.step(8)
    b = _sched("cosine")
    b.load_state_dict(a.state_dict())
    assert b.num_steps == 56 and b.get_lr() == a.get_lr()
    assert b.optimizer.param_groups[0]["lr"] == a.optimizer.param_groups[0]["lr"]
    other = _sched("cosine", max_lr=2.0)
    with pytest.raises(ConfigError, match="override-opt-param-scheduler"):
        other.load_state_dict(a.state_dict())
    kept = _sched("cosine", max_lr=2.0, use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
    kept.load_state_dict(a.state_dict())
    assert kept.max_lr == 2.0
    taken = _sched("cosine", max_lr=2.0, use_checkpoint_opt_param_scheduler=True)
    taken.load_state_dict(a.state_dict())
    assert taken.max_lr == 1.0 and taken.get_lr() == a.get_lr()


def test_steps_from_iterations_samples_and_fraction():
    cfg = OptimizerConfig(lr=1e-3, lr_warmup_iters=2, lr_decay_iters=50).validate()
    assert scheduler_steps(cfg, 100, None, 8) == (16, 400, 800)
    cfg = OptimizerConfig(lr=1e-3, lr_warmup_fraction=0.1).validate()
    assert scheduler_steps(cfg, 100, None, 8) == (pytest.approx(80), 800, 800)
    cfg = OptimizerConfig(lr=1e-3, lr_warmup_samples=64).validate()
    assert scheduler_steps(cfg, None, 1000, 8) == (64, 1000, 1000)
    with pytest.raises(ConfigError, match="--lr-warmup-iters"):
        scheduler_steps(OptimizerConfig(lr=1e-3, lr_warmup_iters=3), None, 1000, 8)
    with pytest.raises(ConfigError, match="--lr-decay-samples"):
        scheduler_steps(OptimizerConfig(lr=1e-3, lr_decay_samples=3), 10, None, 8)


def test_build_scheduler_from_config():
    cfg = OptimizerConfig(lr=1.0, min_lr=0.0, lr_decay_style="linear", lr_warmup_iters=1,
                          weight_decay_incr_style="linear", weight_decay=0.0, start_weight_decay=0.0,
                          end_weight_decay=0.2).validate()
    opt = _opt()
    s = build_scheduler(opt, cfg, train_iters=11, train_samples=None, global_batch_size=4)
    s.step(4 * 6)  # iteration 6 of 11, decay over iterations 1..11
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.2 * 6 / 11)
    # A checkpoint holds the state dict: plain data that names no module, so checkpoints saved while the
    # scheduler was megatron/optimizer_param_scheduler.py (before it moved into megatron/optimizer/) load.
    saved = pickle.dumps(s.state_dict())
    assert b"megatron" not in saved and b"Scheduler" not in saved
    again = build_scheduler(_opt(), cfg, train_iters=11, train_samples=None, global_batch_size=4)
    again.load_state_dict(pickle.loads(saved))
    assert again.num_steps == s.num_steps and again.get_lr() == s.get_lr()


@pytest.mark.parametrize("kwargs, flag", [
    ({}, "--lr is required"),
    ({"lr": 0.1, "min_lr": 0.2}, "--min-lr"),
    ({"lr": 0.1, "lr_decay_style": "step"}, "--lr-decay-style"),
    ({"lr": 0.1, "lr_warmup_fraction": 0.1, "lr_warmup_iters": 5}, "--lr-warmup-fraction"),
    ({"lr": 0.1, "weight_decay_incr_style": "linear"}, "--start-weight-decay"),
    ({"lr": 0.1, "start_weight_decay": 0.1}, "--weight-decay-incr-style"),
    ({"lr": 0.1, "weight_decay_incr_style": "cosine", "start_weight_decay": 0.2, "end_weight_decay": 0.1},
     "--end-weight-decay"),
    ({"lr": 0.1, "fp16": True, "bf16": True}, "--bf16"),
    ({"lr": 0.1, "loss_scale": 0.0}, "--loss-scale"),
    ({"lr": 0.1, "hysteresis": 0}, "--hysteresis"),
    ({"lr": 0.1, "min_loss_scale": 8.0, "initial_loss_scale": 4.0}, "--min-loss-scale"),
    ({"lr": 0.1, "optimizer": "lamb"}, "--optimizer"),
    ({"lr": 0.1, "clip_grad": -1.0}, "--clip-grad"),
])
def test_config_errors_name_the_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        OptimizerConfig(**kwargs).validate()


def test_scheduler_rejects_bad_lengths():
    with pytest.raises(ConfigError, match="warm-up"):
        _sched(warmup=200, decay=100)
    with pytest.raises(ConfigError, match="decay length"):
        _sched(warmup=0, decay=0)
