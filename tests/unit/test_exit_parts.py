"""Our exit parts in one process: --use-exit-linear (zero-init equals the model without it; order block ->
linear -> norm), the estimator (its input is the trunk state, detached), the deferred teacher objective,
the frozen backbone without autograd, stopping after the last exit, and the exit_vocab buffer."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megatron.config import ConfigError, EarlyExitConfig
from megatron.core.parallel_state import ParallelState
from megatron.model import EarlyExitGPTModel
from megatron.model.exit_objective import exit_terms, teacher_targets
from megatron.model.state_dict_sharding import full_state_dict_specs, merge_state_dicts, shard_state_dict
from megatron.training.forward_backward import ScheduleOptions, build_schedule, forward_backward
from megatron.training.setup import _freeze_backbone
from megatron.testing.models import GPT, LLAMA
from megatron.testing.models import random_batch as data
from megatron.testing.models import split_config as cfg
from megatron.testing.models import split_model as build_split

EXITS = dict(exit_layer_nums=[1, 3], use_exit_norm=True)


def _model(c, **ee):
    return EarlyExitGPTModel(c, EarlyExitConfig(**{**EXITS, **ee}), state=ParallelState.single())


@pytest.mark.parametrize("arch", [GPT, LLAMA], ids=["gpt", "llama"])
@pytest.mark.parametrize("parts", [dict(), dict(use_exit_mlp=True), dict(use_exit_block=True, pre_exit=True)])
def test_zero_initialised_exit_linear_equals_the_model_without_it(arch, parts):
    c = cfg(**arch)
    ids, labels = data()
    plain, linear = _model(c, **parts), _model(c, use_exit_linear=True, **parts)
    missing = linear.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == [f"language_model.encoder.layers.{i}.exit_linear.{p}" for i in (0, 2)
                               for p in ("bias", "weight")]
    a, b = plain(ids, labels=labels), linear(ids, labels=labels)
    assert torch.equal(a.output, b.output)
    for layer in (1, 3):
        assert torch.equal(a.exit_losses[layer], b.exit_losses[layer])
    b.exit_losses[1].mean().backward()
    assert linear.language_model.encoder.layers[0].exit_linear.weight.grad.abs().sum() > 0  # it trains


def test_exit_hidden_is_block_then_linear_then_norm():
    c = cfg(**LLAMA)
    m = _model(c, use_exit_linear=True, use_exit_block=True)
    layer = m.language_model.encoder.layers[0]
    with torch.no_grad():
        layer.exit_linear.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        layer.exit_linear.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    h = torch.randn(8, 2, 32)
    block = layer.exit_block(h)
    expected = layer.exit_norm(block + block @ layer.exit_linear.weight.t() + layer.exit_linear.bias)
    torch.testing.assert_close(layer.exit_head(h), expected)


@pytest.mark.parametrize("pre", [False, True])
def test_estimator_reads_the_detached_trunk_state(pre):
    c = cfg(**LLAMA)
    extra = dict(use_exit_block=True) if pre else dict(use_exit_mlp=True)
    m = _model(c, exit_estimator=True, exit_estimator_hidden=16, pre_exit=pre, exit_distillation_weight=0.5, **extra)
    ids, labels = data()
    seen = {}
    layer = m.language_model.encoder.layers[2]  # exit 3
    layer.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], y=out[0]))
    out = m(ids, labels=labels, teacher=True)
    trunk = seen["x"] if pre else seen["y"]
    assert torch.equal(out.exit_states[3].trunk, trunk) and not out.exit_states[3].trunk.requires_grad
    est = layer.exit_estimator
    x = trunk / torch.sqrt(trunk.pow(2).mean(-1, keepdim=True) + c.norm_epsilon)
    ref = F.linear(F.gelu(F.linear(x, est.hidden.weight, est.hidden.bias)), est.output.weight, est.output.bias)
    torch.testing.assert_close(m.exit_estimate(3, trunk), ref.squeeze(-1))
    rows = trunk.reshape(-1, 32)  # the inference call: [rows, h] -> [rows]
    assert m.exit_estimate(3, rows).shape == (rows.shape[0],)
    terms = m.exit_objective(out.exit_states, labels, out.output)
    terms[3].estimator.mean().backward()
    grads = {k for k, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {f"language_model.encoder.layers.2.exit_estimator.{n}.{p}" for n in ("hidden", "output")
                     for p in ("weight", "bias")}
    with pytest.raises(ValueError, match="no estimator at layer 2"):
        m.exit_estimate(2, rows)


@pytest.mark.parametrize("arch", [GPT, LLAMA], ids=["gpt", "llama"])
def test_deferred_objective_equals_the_terms_of_the_full_forward(arch):
    """teacher=True on a model split over 2 stages (seeded init: the same weights as unsplit): the head's
    targets handed back to stage 0's exit give the terms computed from the unsplit model's own logits."""
    c = cfg(**arch)
    ee = EarlyExitConfig(exit_layer_nums=[1, 3], use_exit_norm=True, use_exit_linear=True, exit_estimator=True,
                         exit_distillation_weight=0.6, exit_distillation_top_k=5, exit_distillation_temperature=2.0,
                         exit_layer_temperature=[1.5, 1.0])
    ids, labels = data()
    (ref,) = build_split(c, ee, 1)
    s0, s1 = build_split(c, ee, 2)
    full = ref(ids, labels=None)  # exit and final logits of the unsplit model
    a = s0(ids, labels=labels, teacher=True)
    b = s1(hidden_states=a.output, labels=labels, teacher=True)
    terms = {**s0.exit_objective(a.exit_states, labels, b.output), **s1.exit_objective(b.exit_states, labels, b.output)}
    targets = teacher_targets(full.output.transpose(0, 1), 5, 2.0, None, c.vocab_size)
    assert torch.equal(b.output.ids, targets.ids)
    for layer, t_exit in ((1, 1.5), (3, 1.0)):
        logits = full.exit_logits[layer].transpose(0, 1)
        want = exit_terms(logits, labels, targets, None, weight=0.6, temperature=2.0, exit_temperature=t_exit)
        torch.testing.assert_close(terms[layer].loss, want.loss, rtol=1e-5, atol=1e-6)
        assert torch.equal(terms[layer].agree, want.agree)


def test_frozen_backbone_builds_no_graph_and_trains_the_exits_the_same():
    c = cfg(**LLAMA)
    ids, labels = data()
    free, frozen = _model(c, use_exit_mlp=True), _model(c, use_exit_mlp=True)
    frozen.frozen_backbone = True
    free_out = free(ids, labels=labels)
    out = frozen(ids, labels=labels)
    # Every backbone parameter still requires grad here: only the frozen forward keeps autograd away.
    assert out.output.grad_fn is None and free_out.output.grad_fn is not None
    torch.testing.assert_close(out.output, free_out.output, rtol=0, atol=0)
    sum(v.mean() for v in out.exit_losses.values()).backward()
    sum(v.mean() for v in free_out.exit_losses.values()).backward()
    free_params = dict(free.named_parameters())
    for k, p in frozen.named_parameters():
        # The exits' tied projection is the head's weight: EE-Tuning's freeze turns its grad off.
        exit_part = "exit" in k or ".branch." in k or k == "language_model.output_layer.weight"
        if exit_part:
            torch.testing.assert_close(p.grad, free_params[k].grad, rtol=1e-6, atol=1e-7, msg=k)
        else:
            assert p.grad is None, k


def test_stop_after_exits_runs_nothing_after_the_last_exit():
    c = cfg(**GPT)
    m = _model(c)
    ids, labels = data()
    ran = []
    for i, layer in enumerate(m.language_model.encoder.layers):
        layer.register_forward_hook(lambda mod, args, out, i=i: ran.append(i))
    m.language_model.encoder.final_norm.register_forward_hook(lambda *a: ran.append("final_norm"))
    full = m(ids, labels=labels)
    ran.clear()
    out = m(ids, labels=labels, stop_after_exits=True)
    assert ran == [0, 1, 2] and out.output is None
    for layer in (1, 3):
        assert torch.equal(out.exit_losses[layer], full.exit_losses[layer])


def test_exit_vocab_buffer_lives_on_exit_chunks_and_is_refused_unfilled():
    c = cfg(**GPT)
    ee = EarlyExitConfig(exit_layer_nums=[3], exit_vocab_size=6)
    s0, s1 = build_split(c, ee, 2)
    assert "exit_vocab" not in s0.state_dict() and s1.state_dict()["exit_vocab"].dtype == torch.int64
    with pytest.raises(ValueError, match="not filled.*--conversion-type exit-vocab"):
        s1.exit_vocabulary()
    s1.exit_vocab.copy_(torch.tensor([1, 4, 5, 9, 20, 33]))
    assert s1.exit_vocabulary().tolist() == [1, 4, 5, 9, 20, 33]
    with pytest.raises(ConfigError, match=r"--exit-vocab-size \(101\) exceeds the vocabulary \(100\)"):
        build_split(c, dataclasses.replace(ee, exit_vocab_size=101), 1)
    with pytest.raises(ConfigError, match="--exit-estimator needs at least one exit"):
        EarlyExitConfig(exit_estimator=True).validate(4)


def test_new_tensors_shard_and_merge_bit_exactly():
    c = cfg(**LLAMA, padded_vocab_size=128)
    ee = EarlyExitConfig(exit_layer_nums=[1, 3, 4], use_exit_linear=True, exit_estimator=True,
                         exit_estimator_hidden=8, exit_vocab_size=5)
    specs = full_state_dict_specs(c, ee)
    assert specs["exit_vocab"].shape == (5,)
    assert specs["language_model.encoder.layers.2.exit_linear.weight"].shape == (32, 32)
    assert specs["language_model.encoder.layers.3.exit_estimator.output.weight"].shape == (1, 8)
    g = torch.Generator().manual_seed(0)
    full = {k: torch.randn(s.shape, generator=g) for k, s in specs.items()}
    full["exit_vocab"] = torch.tensor([3, 7, 8, 11, 40])
    for tp, pp in ((2, 2), (1, 4)):
        part = build_split(c, ee, pp)[0].partition
        per_rank = {(r, s, 0): shard_state_dict(full, c, tp, r, part, s, 0, ee) for r in range(tp) for s in range(pp)}
        holders = sorted(s for (r, s, _), sd in per_rank.items() if "exit_vocab" in sd and r == 0)
        assert holders == part.exit_stages
        merged = merge_state_dicts(per_rank, c, tp, part, ee)
        assert merged.keys() == full.keys() and all(torch.equal(merged[k], full[k]) for k in full)


def test_tuning_stream_runs_nothing_after_the_last_exit():
    """--tune-exit with the CE objective through the training step: the deepest exit stage stops after its
    last exit (no later layer, no final norm, no head), and the exit losses are those of the full model."""
    c = cfg(**GPT)
    m = _model(c)
    _freeze_backbone([m])
    ids, labels = data()
    batch = {"tokens": ids, "labels": labels, "loss_mask": torch.ones_like(labels, dtype=torch.float)}
    want = m(ids, labels=labels)
    ran = []
    m.language_model.encoder.layers[3].register_forward_hook(lambda *a: ran.append("layer 4"))
    m.language_model.encoder.final_norm.register_forward_hook(lambda *a: ran.append("final norm"))
    schedule = build_schedule(1, 1, 2, m.partition.exit_positions, ScheduleOptions(tune_exit=True))
    losses = forward_backward(schedule, [m], lambda mb: batch, ParallelState.single(), tensor_shape=(8, 2, 32),
                              exit_weights={1: 1.0, 3: 1.0}).mean()
    assert ran == [] and set(losses) == {"early loss [1]", "early loss [3]"}
    for layer in (1, 3):
        assert abs(losses[f"early loss [{layer}]"] - float(want.exit_losses[layer].mean().detach())) < 1e-6


def test_model_only_load_keeps_fresh_exit_parts_and_nothing_else():
    from megatron.checkpoint.layout import CheckpointError
    from megatron.checkpoint.load import _load_model

    c = cfg(**GPT)
    plain = _model(c).state_dict()
    ours = _model(c, use_exit_linear=True, exit_estimator=True, exit_vocab_size=4)
    estimator = ours.language_model.encoder.layers[0].exit_estimator.hidden.weight.clone()
    _load_model({"model": plain}, "ckpt.pt", [ours], strict=True, fresh_parts=True)
    assert torch.equal(ours.language_model.encoder.layers[0].exit_estimator.hidden.weight, estimator)
    assert ours.exit_vocab.tolist() == [-1] * 4
    with pytest.raises(CheckpointError, match="exit_linear"):  # a resumed run (optimizer state) stays strict
        _load_model({"model": plain}, "ckpt.pt", [ours], strict=True, fresh_parts=False)
    broken = {k: v for k, v in plain.items() if "exit_norm" not in k}
    with pytest.raises(CheckpointError, match=r"missing keys \['language_model.encoder.layers.0.exit_norm.bias'"):
        _load_model({"model": broken}, "ckpt.pt", [ours], strict=True, fresh_parts=True)
