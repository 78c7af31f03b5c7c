"""One-process optimizer: parameter groups, fp32 vs bf16/fp16 master paths, loss scaling, skips, checkpoints."""

import pytest
import torch

from megatron.core.distributed.grad_buffer import GradBuffers
from megatron.core.parallel_state import ParallelState
from megatron.optimizer import (
    ConstantGradScaler,
    DynamicGradScaler,
    OptimizerConfig,
    build_grad_scaler,
    get_megatron_optimizer,
    get_param_groups,
)
from megatron.optimizer.optimizer_param_scheduler import OptimizerParamScheduler

SINGLE = ParallelState.single()


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 3))
    return model.to(dtype)


def _data(steps):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(5, 4, generator=g) for _ in range(steps)]


def _backward(model, buffers, x, scale=1.0):
    buffers.zero_grad()
    buffers.start_grad_sync()
    (model(x.to(model[0].weight.dtype)).float().square().mean() * scale).backward()
    buffers.finish_grad_sync()


def _setup(dtype=torch.float32, grad_dtype=None, **cfg):
    model = _model(dtype)
    buffers = GradBuffers(model.parameters(), None, 1, grad_dtype=grad_dtype)
    config = OptimizerConfig(**{"lr": 0.05, "weight_decay": 0.1, "clip_grad": 0.3, **cfg}).validate()
    return model, buffers, get_megatron_optimizer(config, [model], SINGLE, [buffers])


def test_param_groups_follow_megatron_rules():
    model = _model()
    model[0].weight.requires_grad_(False)
    groups = get_param_groups([model], scale_lr_cond=lambda name, p: name.startswith("2."), lr_mult=3.0)
    summary = [(sorted(tuple(p.shape) for p in g["params"]), g["wd_mult"], g["lr_mult"]) for g in groups]
    assert summary == [
        ([(3, 6)], 1.0, 3.0),
        ([(6,), (6,), (6,)], 0.0, 1.0),
        ([(3,)], 0.0, 3.0),
    ]
    model.requires_grad_(False)
    assert get_param_groups([model]) == []


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_fp32_equals_torch_optimizer_with_clip_grad_norm(kind):
    model, buffers, opt = _setup(optimizer=kind)
    ref = _model()
    groups = [{"params": g["params"], "weight_decay": 0.1 * g["wd_mult"]} for g in get_param_groups([ref])]
    ref_opt = torch.optim.AdamW(groups, lr=0.05) if kind == "adam" else torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    for x in _data(4):
        _backward(model, buffers, x)
        ok, norm, _ = opt.step()
        ref_opt.zero_grad()
        ref(x).square().mean().backward()
        want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.3)
        ref_opt.step()
        assert ok and norm == pytest.approx(want.item(), rel=1e-6)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("grad_dtype", [torch.float32, None])
def test_bf16_keeps_fp32_masters_and_steps_them_like_fp32(grad_dtype):
    """The bf16 model's masters follow exactly the fp32 update computed from the same gradients, and the
    model holds their rounding; tiny updates that bf16 weights would lose accumulate in the masters."""
    model, buffers, opt = _setup(torch.bfloat16, grad_dtype, bf16=True, lr=1e-4)
    assert opt.grad_scaler is None and opt.loss_scale == 1.0
    masters = [p.detach().float().clone().requires_grad_(True) for p in model.parameters()]
    master_of = {id(p): m for p, m in zip(model.parameters(), masters)}
    groups = [{"params": [master_of[id(p)] for p in g["params"]], "weight_decay": 0.1 * g["wd_mult"]}
              for g in get_param_groups([model])]
    ref_opt = torch.optim.AdamW(groups, lr=1e-4)
    start = [p.detach().clone() for p in model.parameters()]
    for x in _data(3):
        _backward(model, buffers, x)
        grads = [p.main_grad.float().clone() for p in model.parameters()]
        assert opt.step()[0]
        for m, g in zip(masters, grads):
            m.grad = g
        torch.nn.utils.clip_grad_norm_(masters, 0.3)
        ref_opt.step()
    for p, m in zip(model.parameters(), masters):
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p, m.detach().to(torch.bfloat16), rtol=0, atol=0)
    for s in opt.slots:
        torch.testing.assert_close(s.master, master_of[id(s.param)].detach(), rtol=1e-6, atol=1e-8)
    # lr 1e-4 moves most weights by less than half a bf16 ulp: only the fp32 masters keep those updates
    frozen_in_bf16 = 0
    for p, s0 in zip(model.parameters(), start):
        slot = next(s for s in opt.slots if s.param is p)
        frozen_in_bf16 += int((torch.eq(p, s0) & torch.ne(slot.master, s0.float())).sum())
    assert frozen_in_bf16 > 10


def test_fp16_loss_scale_is_undone_before_the_update():
    ref_model, ref_buffers, ref_opt = _setup(torch.float16, torch.float32, fp16=True, loss_scale=1.0)
    model, buffers, opt = _setup(torch.float16, torch.float32, fp16=True, initial_loss_scale=1024.0)
    assert isinstance(opt.grad_scaler, DynamicGradScaler) and isinstance(ref_opt.grad_scaler, ConstantGradScaler)
    for x in _data(3):
        _backward(ref_model, ref_buffers, x, ref_opt.loss_scale)
        _backward(model, buffers, x, opt.loss_scale)
        assert ref_opt.step()[0] and opt.step()[0]
    for a, b in zip(ref_opt.slots, opt.slots):
        torch.testing.assert_close(a.master, b.master, rtol=1e-5, atol=1e-6)


def test_inf_skips_the_step_and_the_dynamic_scaler_backs_off():
    model, buffers, opt = _setup(torch.float16, torch.float32, fp16=True, initial_loss_scale=64.0,
                                 loss_scale_window=2, hysteresis=2)
    x = _data(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    scales = []
    for poison in (True, True, False, False, True):
        _backward(model, buffers, x, opt.loss_scale)
        if poison:
            model[2].weight.main_grad[0, 0] = float("inf")
        ok, norm, _ = opt.step()
        assert ok is not poison and (norm is None) is poison
        scales.append(opt.loss_scale)
        if poison and len(scales) == 1:
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    # hysteresis 2: the first overflow keeps the scale, the second halves it; a clean window doubles it,
    # and refills hysteresis, so the next overflow keeps the scale again.
    assert scales == [64.0, 32.0, 32.0, 64.0, 64.0]
    assert opt.num_skipped_iters == 3


def test_dynamic_scaler_unit_semantics():
    s = DynamicGradScaler(initial_scale=8.0, min_scale=2.0, growth_interval=3, hysteresis=1)
    for found in (True, True, True):
        s.update(found)
    assert s.scale == 2.0  # floored at min
    for _ in range(2):
        s.update(False)
    assert s.scale == 2.0 and s.growth_tracker == 2
    s.update(True)  # an overflow resets the growth window
    s.update(False), s.update(False)
    assert s.scale == 2.0
    s.update(False)
    assert s.scale == 4.0
    t = DynamicGradScaler(initial_scale=8.0, min_scale=2.0, growth_interval=3, hysteresis=1)
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()


def test_scaler_choice_follows_flags():
    assert build_grad_scaler(OptimizerConfig(lr=1.0)) is None
    assert build_grad_scaler(OptimizerConfig(lr=1.0, bf16=True)) is None
    assert build_grad_scaler(OptimizerConfig(lr=1.0, bf16=True, loss_scale=8.0)).scale == 8.0
    assert OptimizerConfig(lr=1.0, bf16=True).main_grad_dtype == torch.float32
    assert OptimizerConfig(lr=1.0, fp16=True).main_grad_dtype is None
    assert OptimizerConfig(lr=1.0, fp16=True, accumulate_allreduce_grads_in_fp32=True).main_grad_dtype == torch.float32
    dyn = build_grad_scaler(OptimizerConfig(lr=1.0, fp16=True))
    assert (dyn.scale, dyn.min_scale, dyn.growth_interval, dyn.hysteresis) == (2.0**32, 1.0, 1000, 2)


def test_nan_without_scaler_skips_instead_of_corrupting_weights():
    model, buffers, opt = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    _backward(model, buffers, _data(1)[0])
    model[0].bias.main_grad[1] = float("nan")
    assert opt.step() == (False, None, None)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt.num_skipped_iters == 1


def test_empty_optimizer_is_a_no_op():
    model = _model()
    model.requires_grad_(False)
    for distributed in (False, True):
        buffers = GradBuffers(model.parameters(), None, 1, reduce_scatter=distributed)
        cfg = OptimizerConfig(lr=1.0, use_distributed_optimizer=distributed, log_num_zeros_in_grad=True).validate()
        opt = get_megatron_optimizer(cfg, [model], SINGLE, [buffers])
        assert opt.param_groups == [] and opt.state_bytes() == 0
        assert opt.step() == (True, 0.0, 0)
        opt.load_state_dict(opt.state_dict())
        scheduler = OptimizerParamScheduler(opt, 0.0, 1.0, 0.0, 1, 10, "cosine", 0.1, 0.1, 10, "constant")
        scheduler.step(3)
        assert scheduler.get_lr() < 1.0


def test_state_dict_resumes_exactly():
    data = _data(4)
    model, buffers, opt = _setup(torch.bfloat16, torch.float32, bf16=True, loss_scale=4.0)
    for x in data:
        _backward(model, buffers, x, opt.loss_scale)
        opt.step()
    model2, buffers2, opt2 = _setup(torch.bfloat16, torch.float32, bf16=True, loss_scale=4.0)
    for x in data[:2]:
        _backward(model2, buffers2, x, opt2.loss_scale)
        opt2.step()
    saved = opt2.state_dict()
    weights = [p.detach().clone() for p in model2.parameters()]
    model3, buffers3, opt3 = _setup(torch.bfloat16, torch.float32, bf16=True, loss_scale=4.0)
    with torch.no_grad():
        for p, w in zip(model3.parameters(), weights):
            p.copy_(w)
    opt3.load_state_dict(saved)
    for x in data[2:]:
        _backward(model3, buffers3, x, opt3.loss_scale)
        opt3.step()
    for p, q in zip(model.parameters(), model3.parameters()):
        assert torch.equal(p, q)
    for a, b in zip(opt.slots, opt3.slots):
        assert torch.equal(a.master, b.master)


def test_incompatible_checkpoint_and_missing_main_grad_are_clear_errors():
    _, _, opt = _setup()
    other = torch.nn.Linear(2, 2)
    GradBuffers(other.parameters(), None, 1)
    small = get_megatron_optimizer(OptimizerConfig(lr=1.0), [other], SINGLE)
    with pytest.raises(ValueError, match="--no-load-optim"):
        small.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="GradBuffers"):
        get_megatron_optimizer(OptimizerConfig(lr=1.0), [torch.nn.Linear(2, 2)], SINGLE)
    with pytest.raises(ValueError, match="reduce_scatter=True"):
        get_megatron_optimizer(OptimizerConfig(lr=1.0, use_distributed_optimizer=True), [other], SINGLE,
                               [GradBuffers(other.parameters(), None, 1)])
