"""Memory savings change memory, never gradients: at pp = 4 with exits, full recompute (uniform and block)
and selective recompute, and keeping the sent outputs instead of freeing them, give every gradient and
loss of the default run (no recompute, sent outputs freed), bit for bit, under every schedule (1F1B,
interleaved 1F1B, bubble filling, the EE-Tuning stream), dropout on.

Recompute: these are the cases where a checkpointed layer group's input does not require grad: a cool-down
fill's truncated backward receives an activation it sends no gradient back for, and EE-Tuning's frozen
backbone hands the exit layers activations without autograd history (issue 14, item 1: their gradients
were lost). Freed outputs (item 11): the exit norms of the tied and untied variants save the very hidden
state a stage sends.
"""

from dataclasses import replace

import pytest
import torch

from megatron.core.distributed.finalize import TiedGroups, late_params
from megatron.core.distributed.grad_buffer import GradBuffers
from megatron.core.parallel_state import ParallelDims, ParallelState
from megatron.core.tensor_parallel.random import model_parallel_seed
from megatron.model import EarlyExitGPTModel
from megatron.model.partition import partition as make_partition
from megatron.testing.distributed import run_distributed
from megatron.testing.pipeline import LAYERS, MBS, SEQ, configs, microbatch
from megatron.training.forward_backward import ScheduleOptions, activation_shape, build_schedule, forward_backward
from megatron.training.setup import is_exit_param

MODES = {  # name: (model flags, free sent outputs)
    "none": ({}, True),
    "outputs kept": ({}, False),
    "full-uniform": (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1), True),
    "full-block": (dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1), True),
    "selective": (dict(recompute_granularity="selective"), True),
}
FILL = ScheduleOptions(fill_explicit_bubbles=True, num_fill_warmup_microbatches=2, num_fill_cooldown_microbatches=2)
SCHEDULES = {  # name: (vpp, arch, exits, options, microbatches)
    "1f1b": (1, "llama", "untied", ScheduleOptions(), 4),
    "interleaved": (2, "gpt", "pre", ScheduleOptions(), 4),
    "filling": (1, "gpt", "tied", FILL, 8),
    "tuning-exit-mlp": (1, "llama", "untied", ScheduleOptions(tune_exit=True), 3),
    "tuning-exit-block": (1, "gpt", "pre", ScheduleOptions(tune_exit=True), 3),
}


def _worker(rank, world, vpp, arch, exits, opts, m):
    state = ParallelState.build(ParallelDims.from_world(world, pp=4, vpp=vpp if vpp > 1 else None))
    base, ee = configs(arch, exits)
    base = replace(base, hidden_dropout=0.1, attention_dropout=0.1)
    part = make_partition(LAYERS, 4, vpp, ee.exit_layer_nums)
    schedule = build_schedule(4, vpp, m, part.exit_stages, opts)
    out = {}
    for mode, (flags, deallocate) in MODES.items():
        tracker = model_parallel_seed(1234 + 100 * state.pp_rank, state)  # same dropout masks in every mode
        chunks = [EarlyExitGPTModel(replace(base, **flags), ee, state=state, partition=part, chunk=c,
                                    rng_tracker=tracker) for c in range(vpp)]
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                p.requires_grad_(not opts.tune_exit or (is_exit_param(name) and not getattr(p, "shared", False)))
        buffers = [GradBuffers(c.parameters(), state.dp_group, state.dp, late_params=late_params(c)) for c in chunks]
        losses = forward_backward(
            schedule, chunks, lambda mb: microbatch(0, mb), state,
            tensor_shape=activation_shape(SEQ, MBS, 32, 1, False),
            exit_weights=dict(zip(ee.exit_layer_nums, ee.weights)), grad_buffers=buffers,
            tied_groups=None if opts.tune_exit else TiedGroups(chunks, state), deallocate_outputs=deallocate)
        grads = {(state.pp_rank, c, n): p.main_grad.clone()
                 for c, chunk in enumerate(chunks) for n, p in chunk.named_parameters() if p.requires_grad}
        out[mode] = grads, losses.mean()
    return out


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_memory_savings_keep_every_gradient(name):
    vpp, arch, exits, opts, m = SCHEDULES[name]
    results = run_distributed(_worker, 4, vpp, arch, exits, opts, m, timeout=240)
    for mode in MODES:
        got = {k: g for r in results for k, g in r[mode][0].items()}
        want = {k: g for r in results for k, g in r["none"][0].items()}
        assert got.keys() == want.keys() and want
        assert any(g.abs().sum() > 0 for k, g in want.items() if k[0] == 3), "no gradient reached stage 3"
        for key, g in want.items():
            assert torch.equal(got[key], g), f"{name}, {mode}: gradient of {key} differs from no recompute"
        for stage, r in enumerate(results):
            assert r[mode][1] == r["none"][1], f"{name}, {mode}: stage {stage} losses differ"
