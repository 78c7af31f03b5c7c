"""Parallel equals serial for EE-Tuning with the final head as teacher (ee_tuning_with_teacher): at tp 2
(sequence parallel too), pp 2, pp 4 (exits on three stages, one stage between them only passing the
targets on) and tp 2 x pp 2, every exit parameter's gradient and the logged exit losses, agreements and
estimator losses equal one process running the unsplit model on the same microbatches."""

import re

import pytest
import torch

from megatron.config import EarlyExitConfig
from megatron.core.distributed.finalize import late_params
from megatron.core.distributed.grad_buffer import GradBuffers
from megatron.core.parallel_state import ParallelDims, ParallelState
from megatron.core.pipeline_parallel.schedules import simulate, validate
from megatron.core.tensor_parallel import gather_full_tensor
from megatron.model import EarlyExitGPTModel
from megatron.model.partition import partition as make_partition
from megatron.testing.distributed import run_distributed
from megatron.testing.pipeline import LAYERS, MBS, SEQ, VOCAB, model_config
from megatron.training.forward_backward import ScheduleOptions, activation_shape, build_schedule, forward_backward
from megatron.training.setup import is_exit_param

M = 3
OBJECTIVE = dict(exit_layer_nums=[2, 5, 8], exit_layer_weight=[0.3, 0.6, 0.9], exit_layer_temperature=[1.5, 1.0, 1.0],
                 use_exit_norm=True, use_exit_linear=True, exit_estimator=True, exit_estimator_hidden=8,
                 exit_estimator_loss_weight=0.7, exit_distillation_weight=0.6, exit_distillation_top_k=6,
                 exit_distillation_temperature=2.0)
TEACHER = ScheduleOptions(tune_exit=True, teacher=True)


def configs(arch, sp=False, **ee):
    return model_config(arch, sp), EarlyExitConfig(**{**OBJECTIVE, **ee})


def microbatch(mb):
    g = torch.Generator().manual_seed(mb)
    text = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g)
    mask = (torch.rand(MBS, SEQ, generator=g) > 0.2).float()
    return {"tokens": text[:, :-1], "labels": text[:, 1:], "loss_mask": mask}


def _tune(model):
    for name, p in model.named_parameters():
        p.requires_grad_(is_exit_param(name) and not getattr(p, "shared", False))
    model.frozen_backbone = True
    return model


def _global(model, name):
    """A chunk's parameter name in the unsplit model."""
    m = re.match(r"language_model\.encoder\.layers\.(\d+)\.(.*)", name)
    if m:
        return f"language_model.encoder.layers.{model.spec.layers[int(m.group(1))] - 1}.{m.group(2)}"
    m = re.match(r"language_model\.exit_output_layer\.(\d+)\.(.*)", name)
    if m:
        k = list(model.partition.exit_layers).index(model.spec.exits[int(m.group(1))])
        return f"language_model.exit_output_layer.{k}.{m.group(2)}"
    return name


def _masked(v, mask):
    return (v * mask).sum() / mask.sum()


def reference(model_cfg, ee):
    """The objective written out on the unsplit model: grads by name and the mean logged values."""
    model = _tune(EarlyExitGPTModel(model_cfg, ee, state=ParallelState.single()))
    weights = dict(zip(ee.exit_layer_nums, ee.weights))
    logged = {}
    for mb in range(M):
        data = microbatch(mb)
        out = model(data["tokens"], labels=data["labels"], teacher=True)
        terms = model.exit_objective(out.exit_states, data["labels"], out.output)
        total = 0.0
        for layer, t in terms.items():
            values = {f"early loss [{layer}]": _masked(t.loss, data["loss_mask"]),
                      f"exit agreement [{layer}]": _masked(t.agree, data["loss_mask"]),
                      f"estimator loss [{layer}]": _masked(t.estimator, data["loss_mask"])}
            for k, v in values.items():
                logged.setdefault(k, []).append(float(v.detach()))
            total = total + weights[layer] * values[f"early loss [{layer}]"]
            total = total + ee.exit_estimator_loss_weight * values[f"estimator loss [{layer}]"]
        (total / M).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return grads, {k: sum(v) / len(v) for k, v in logged.items()}


def worker(rank, world, tp, pp, arch, sp, ee_kw):
    state = ParallelState.build(ParallelDims.from_world(world, tp=tp, pp=pp))
    model_cfg, ee = configs(arch, sp, **ee_kw)
    part = make_partition(LAYERS, pp, 1, ee.exit_layer_nums)
    chunk = _tune(EarlyExitGPTModel(model_cfg, ee, state=state, partition=part))
    buffers = [GradBuffers(chunk.parameters(), state.dp_group, state.dp, late_params=late_params(chunk))]
    schedule = build_schedule(pp, 1, M, part.exit_positions, TEACHER)
    assert schedule.header.carries_targets
    losses = forward_backward(
        schedule, [chunk], microbatch, state,
        tensor_shape=activation_shape(SEQ, MBS, 32, tp, sp and tp > 1),
        exit_weights=dict(zip(ee.exit_layer_nums, ee.weights)), grad_buffers=buffers)
    grads = {_global(chunk, n): gather_full_tensor(p, p.main_grad, state)
             for n, p in chunk.named_parameters() if p.requires_grad}
    return grads, losses.mean()


LAYOUTS = [  # (tp, pp, arch, sequence parallel, EarlyExitConfig overrides)
    (2, 1, "gpt", True, {}),
    (1, 2, "llama", False, dict(untie_exit_output_weights=True)),
    (1, 4, "gpt", False, {}),
    (2, 2, "llama", False, dict(use_exit_mlp=True, use_dynamic_exit_layer_weight=True)),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "tp{}pp{}-{}{}".format(*l[:3], "-sp" * l[3]))
def test_teacher_tuning_equals_serial(layout):
    tp, pp, arch, sp, ee_kw = layout
    results = run_distributed(worker, tp * pp, tp, pp, arch, sp, ee_kw, timeout=240)
    want_grads, want_logged = reference(*configs(arch, **ee_kw))
    seen, logged = set(), {}
    for grads, losses in results:
        for name, g in grads.items():
            seen.add(name)
            torch.testing.assert_close(g, want_grads[name], rtol=1e-5, atol=2e-7, msg=f"grad {name}")
        logged.update(losses)
    assert seen == set(want_grads)
    assert any("exit_estimator" in n for n in seen) and any("exit_linear" in n for n in seen)
    assert logged.keys() == want_logged.keys()
    for k, v in logged.items():
        assert abs(v - want_logged[k]) <= 1e-5 * max(1.0, abs(want_logged[k])), (k, v, want_logged[k])


def test_teacher_schedule_is_a_valid_pipeline_plan():
    part = make_partition(LAYERS, 4, 1, OBJECTIVE["exit_layer_nums"])
    schedule = build_schedule(4, 1, 5, part.exit_positions, TEACHER)
    validate(schedule)
    assert simulate(schedule).makespan > 0
    eval_schedule = build_schedule(4, 1, 5, part.exit_positions, TEACHER, evaluation=True)
    assert eval_schedule.header.carries_targets  # evaluation needs the targets too (run under no_grad)
