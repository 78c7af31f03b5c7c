"""Parallel equals serial for the early-exit GPT over the pipeline runtime (issue 5's contract).

For (tp, pp, dp, vpp) layouts, bubble filling and the EE-Tuning stream, every rank's final gradients
(tp shards gathered) and reported losses equal one process running the same work: the chunks of the
same partition at tp = 1, driven through the plan's routes (a route says how far each microbatch's
forward goes and where its backward runs), tied copies summed, all dp replicas' data, fp32.
"""

import pytest
import torch

from megatron.core.distributed.finalize import TiedGroups, late_params
from megatron.core.distributed.grad_buffer import GradBuffers
from megatron.core.parallel_state import ParallelDims, ParallelState
from megatron.core.tensor_parallel import gather_full_tensor
from megatron.model import EarlyExitGPTModel
from megatron.model.partition import partition as make_partition
from megatron.testing.distributed import run_distributed
from megatron.testing.pipeline import EXITS, LAYERS, MBS, SEQ, configs, microbatch
from megatron.training.forward_backward import (
    ScheduleOptions,
    activation_shape,
    build_schedule,
    forward_backward,
    gpt_forward_step,
)

def reference(model_cfg, ee, part, schedule, dp):
    """Grads per (stage, chunk, name) and mean losses, one process, tp = 1."""
    single = ParallelState.single()
    chunks = {(s, c): EarlyExitGPTModel(model_cfg, ee, state=single, partition=part, stage=s, chunk=c)
              for s in range(part.pp) for c in range(part.vpp)}
    header = schedule.header
    order = [header.locate(p) for p in range(header.num_positions)]
    weights = dict(zip(ee.exit_layer_nums, ee.weights))
    losses = {}
    for r in range(dp):
        for route in header.routes:
            batch = microbatch(r, route.mb)
            step = gpt_forward_step([chunks[(s, c)] for s, c in order], lambda mb: batch)
            hidden, total = None, 0.0
            for pos in range(route.fwd_last + 1):
                chained = route.chained and pos in route.bwd and (pos - 1) in route.bwd
                out = step(pos, route.mb, None if hidden is None else (hidden if chained else hidden.detach()))
                for layer, v in out.exit_losses.items():
                    losses.setdefault(f"early loss [{layer}]", []).append(float(v.detach()))
                    if pos in route.bwd:
                        total = total + weights[layer] * v
                hidden = out.output
            if route.fwd_last == header.num_positions - 1:
                losses.setdefault("lm loss", []).append(float(hidden.detach()))
                if route.final_loss and route.fwd_last in route.bwd:
                    total = total + hidden
            if torch.is_tensor(total):
                (total / (header.num_microbatches * dp)).backward()
    tied = {}
    for key, model in chunks.items():
        for name, p in model.tied_parameters().items():
            tied.setdefault(name, []).append(p)
    for params in tied.values():
        total = sum(p.grad for p in params if p.grad is not None)
        for p in params:
            p.grad = total.clone()
    grads = {(s, c, n): (p.grad if p.grad is not None else torch.zeros_like(p))
             for (s, c), model in chunks.items() for n, p in model.named_parameters() if p.requires_grad}
    return grads, {k: sum(v) / len(v) for k, v in losses.items()}


def worker(rank, world, tp, pp, vpp, arch, exits, sp, opts, m, tune):
    state = ParallelState.build(ParallelDims.from_world(world, tp=tp, pp=pp, vpp=vpp if vpp > 1 else None))
    model_cfg, ee = configs(arch, exits, sp)
    part = make_partition(LAYERS, pp, vpp, ee.exit_layer_nums)
    chunks = [EarlyExitGPTModel(model_cfg, ee, state=state, partition=part, chunk=c) for c in range(vpp)]
    if tune:
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                p.requires_grad_("exit" in name or ".branch." in name)
    buffers = [GradBuffers(c.parameters(), state.dp_group, state.dp, late_params=late_params(c), bucket_size=2000)
               for c in chunks]
    schedule = build_schedule(pp, vpp, m, part.exit_stages, opts)
    losses = forward_backward(
        schedule, chunks, lambda mb: microbatch(state.dp_rank, mb), state,
        tensor_shape=activation_shape(SEQ, MBS, 32, tp, model_cfg.sequence_parallel and tp > 1),
        exit_weights=dict(zip(ee.exit_layer_nums, ee.weights)), grad_buffers=buffers,
        tied_groups=TiedGroups(chunks, state),
    )
    grads = {(state.pp_rank, c, n): gather_full_tensor(p, p.main_grad, state)
             for c, chunk in enumerate(chunks) for n, p in chunk.named_parameters() if p.requires_grad}
    return grads, losses.mean(), state.dp_rank, state.tp_rank


# Every (tp, pp, dp) from {1, 2, 4} with tp * pp * dp <= 8, plus virtual pipelines.
LAYOUTS = [  # (tp, pp, dp, vpp, arch, exits, sequence parallel)
    (1, 1, 1, 1, "gpt", "tied", False),
    (1, 2, 1, 1, "gpt", "tied", False),
    (1, 4, 1, 1, "llama", "untied", False),
    (2, 2, 1, 1, "llama", "tied", True),
    (1, 2, 2, 1, "gpt", "pre", False),
    (2, 2, 2, 1, "gpt", "untied", False),
    (4, 2, 1, 1, "gpt", "tied", True),
    (2, 4, 1, 1, "gpt", "pre", False),
    (1, 4, 2, 1, "llama", "tied", False),
    (2, 1, 2, 1, "llama", "pre", True),
    (1, 1, 4, 1, "gpt", "untied", False),
    (1, 1, 2, 1, "llama", "tied", False),
    (2, 1, 1, 1, "gpt", "pre", True),
    (4, 1, 1, 1, "gpt", "untied", True),
    (4, 1, 2, 1, "gpt", "tied", False),
    (2, 1, 4, 1, "gpt", "untied", True),
    (1, 2, 4, 1, "llama", "pre", False),
    (1, 2, 1, 2, "gpt", "tied", False),
    (2, 2, 1, 2, "llama", "untied", False),
]


def check(tp, pp, dp, vpp, arch, exits, sp, opts=ScheduleOptions(), m=4, tune=False):
    results = run_distributed(worker, tp * pp * dp, tp, pp, vpp, arch, exits, sp, opts, m, tune, timeout=240)
    model_cfg, ee = configs(arch, exits)
    part = make_partition(LAYERS, pp, vpp, ee.exit_layer_nums)
    schedule = build_schedule(pp, vpp, m, part.exit_stages, opts)
    want_grads, want_losses = reference(model_cfg, ee, part, schedule, dp)
    seen = set()
    for grads, losses, dp_rank, tp_rank in results:
        for key, g in grads.items():
            seen.add(key)
            torch.testing.assert_close(g, want_grads[key], rtol=1e-5, atol=2e-7, msg=f"grad {key}")
        if dp == 1:  # each dp replica reports its own data's losses
            for k, v in losses.items():
                assert abs(v - want_losses[k]) <= 1e-5 * max(1.0, abs(want_losses[k])), (k, v, want_losses[k])
    trainable = {k for k in want_grads if not tune or "exit" in k[2] or ".branch." in k[2]}
    assert seen == trainable
    return results


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "tp{}pp{}dp{}vpp{}-{}-{}{}".format(*l[:6], "-sp" * l[6]))
def test_layout_equals_serial(layout):
    results = check(*layout)
    tp, pp = layout[0], layout[1]
    reported = set().union(*(set(r[1]) for r in results))
    assert "lm loss" in reported and {f"early loss [{k}]" for k in EXITS[layout[5]]["exit_layer_nums"]} <= reported


def test_bubble_filling_equals_serial_plan():
    opts = ScheduleOptions(fill_explicit_bubbles=True, num_fill_warmup_microbatches=2,
                           num_fill_cooldown_microbatches=2, backward_forward_ratio=2.0)
    part = make_partition(LAYERS, 4, 1, EXITS["tied"]["exit_layer_nums"])
    header = build_schedule(4, 1, 8, part.exit_stages, opts).header
    assert header.fill_warmup and header.fill_cooldown
    check(1, 4, 1, 1, "gpt", "tied", False, opts, m=8)


def test_ee_tuning_stream_trains_only_exits():
    check(1, 4, 1, 1, "llama", "untied", False, ScheduleOptions(tune_exit=True), m=3, tune=True)


def _fp16_worker(rank, world, scale):
    state = ParallelState.build(ParallelDims.from_world(world, pp=2))
    model_cfg, ee = configs("gpt", "tied")
    model_cfg.params_dtype = torch.float16
    chunk = EarlyExitGPTModel(model_cfg, ee, state=state)
    buffers = [GradBuffers(chunk.parameters(), None, 1, grad_dtype=torch.float32, late_params=late_params(chunk))]
    schedule = build_schedule(2, 1, 2, [0, 1], ScheduleOptions())
    forward_backward(schedule, [chunk], lambda mb: microbatch(0, mb), state,
                     tensor_shape=activation_shape(SEQ, MBS, 32, 1, False),
                     exit_weights=dict(zip(ee.exit_layer_nums, ee.weights)), grad_buffers=buffers,
                     tied_groups=TiedGroups([chunk], state), loss_scale=scale)
    return {(state.pp_rank, n): p.main_grad / scale for n, p in chunk.named_parameters()}


def test_fp16_loss_scale_applies_to_exit_losses():
    """Under fp16 with a large loss scale, unscaled gradients equal the fp32 run's: exit-only parameters
    (the exit norms) included, which would be off by the scale if exit losses were left unscaled."""
    fp32 = {}
    for grads, *_ in run_distributed(worker, 2, 1, 2, 1, "gpt", "tied", False, ScheduleOptions(), 2, False):
        fp32.update({(s, n): g for (s, c, n), g in grads.items()})
    got = {}
    for grads in run_distributed(_fp16_worker, 2, 4096.0):
        got.update(grads)
    exit_norms = [n for _, n in got if "exit_norm" in n]
    assert exit_norms
    for name, g in got.items():
        want = fp32[name]
        assert torch.isfinite(g).all(), name
        err = (g - want).norm() / want.norm().clamp(min=1e-6)
        assert err < 2e-2, f"{name}: relative error {err:.3g} (fp16 vs fp32)"
