"""Training benchmarks: our optimizer step against plain PyTorch, the cost of exits, and our pipeline runtime
against ``torch.distributed.pipelining``.

One step = ``forward_backward`` (schedule, exit losses, gradient finalisation) + the Megatron optimizer's
``step()`` (inf check, global-norm clipping, AdamW); the baselines do the same work: gradient accumulation
over the same microbatches, global-norm clipping at 1.0, ``torch.optim.AdamW``.

Every measurement runs in forked gloo workers with one torch thread each (pp = 1: one process, pp = 2:
two). The runners compared in one table are built in the same processes and timed in alternating rounds,
one step each, so load from other processes hits them alike; peak memory is measured per runner in a
fresh fork (the meter changes the allocator, see ``bench/common.py``).

1. pp = 1, no exits: ours against ``PlainGPT`` (bench/plain_gpt.py) trained by a plain loop.
2. 2 exits against none at pp = 1 and pp = 2.
3. pp = 2: our 1F1B runtime against ``Schedule1F1B`` over ``PlainGPT`` stages of the same sizes.
4. Activation memory per stage at pp = 2 and 4, with and without exits: sent outputs kept until their
   backward (as before issue 14, item 11, and as EE-LLM does on exit stages) against freed once sent.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import torch
import torch.distributed as dist
# Imported here, not in the workers: its first import costs seconds (dynamo), paid once by the parent
# instead of by every forked worker.
from torch.distributed.pipelining import PipelineStage, Schedule1F1B

from bench.common import PeakMemory, bench_parser, fmt, parse_positive, table, time_step
from bench.plain_gpt import GPTShape, PlainGPT, plain_loss, token_batch
from megatron.config import EarlyExitConfig, ModelConfig
from megatron.core.distributed.finalize import TiedGroups, late_params
from megatron.core.distributed.grad_buffer import GradBuffers
from megatron.core.parallel_state import ParallelDims, ParallelState
from megatron.model import EarlyExitGPTModel
from megatron.model.partition import partition as make_partition
from megatron.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.testing.distributed import run_distributed
from megatron.training.forward_backward import ScheduleOptions, activation_shape, build_schedule, forward_backward

__all__ = ["main", "measure", "our_step", "plain_step", "torch_pipeline_step", "FULL", "QUICK"]

FULL = GPTShape(layers=4, hidden=128, heads=4, seq=128, vocab=8192, mbs=4, m=4)
QUICK = GPTShape(layers=4, hidden=32, heads=2, seq=16, vocab=256, mbs=2, m=2)
EXITS = {1: 0.25, 3: 0.5}  # layer -> weight: one exit on each stage at pp = 2
LR, CLIP, WD = 1e-4, 1.0, 0.01
MIB = 1024 * 1024


def configs(shape: GPTShape, exits: dict[int, float], recompute: bool = False) -> tuple[ModelConfig, EarlyExitConfig]:
    """The benchmark model; ``recompute``: full activation recompute, one layer per checkpoint."""
    full = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) if recompute else {}
    model = ModelConfig(num_layers=shape.layers, hidden_size=shape.hidden, num_attention_heads=shape.heads,
                        vocab_size=shape.vocab, make_vocab_size_divisible_by=128, seq_length=shape.seq,
                        hidden_dropout=0.0, attention_dropout=0.0, untie_embeddings_and_output_weights=True, **full)
    return model, EarlyExitConfig(exit_layer_nums=sorted(exits), exit_layer_weight=[exits[k] for k in sorted(exits)])


def batches(shape: GPTShape, device: torch.device) -> list[dict[str, torch.Tensor]]:
    return [{k: v.to(device) for k, v in token_batch(shape, mb).items()} for mb in range(shape.m)]


def our_step(shape: GPTShape, exits: dict[int, float], state: ParallelState, deallocate: bool = True,
             recompute: bool = False):
    """One training step of our stack on this rank (tp = dp = 1, pp = ``state.pp``); ``deallocate``: free
    sent outputs (the runtime's default); ``recompute``: see :func:`configs`."""
    model_cfg, ee = configs(shape, exits, recompute)
    part = make_partition(shape.layers, state.pp, 1, ee.exit_layer_nums)
    chunk = EarlyExitGPTModel(model_cfg, ee, state=state, partition=part).to(state.device)
    buffers = [GradBuffers(chunk.parameters(), state.dp_group, state.dp, late_params=late_params(chunk))]
    tied = TiedGroups([chunk], state)
    opt = get_megatron_optimizer(OptimizerConfig(lr=LR, clip_grad=CLIP, weight_decay=WD).validate(), [chunk],
                                 state, buffers)
    schedule = build_schedule(state.pp, 1, shape.m, part.exit_stages, ScheduleOptions())
    data = batches(shape, state.device)
    tensor_shape = activation_shape(shape.seq, shape.mbs, shape.hidden, 1, False)

    def step() -> None:
        for b in buffers:
            b.zero_grad()
        forward_backward(schedule, [chunk], data.__getitem__, state, tensor_shape=tensor_shape,
                         exit_weights=dict(exits), grad_buffers=buffers, tied_groups=tied,
                         deallocate_outputs=deallocate)
        opt.step()

    return step


def _clip_global(params: list[torch.nn.Parameter], max_norm: float, group=None) -> None:
    """Global-norm clipping over the ranks of ``group`` (what Megatron's optimizer does across stages)."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.stack([g.pow(2).sum() for g in grads]).sum()
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(total, group=group)
    coef = max_norm / (float(total.sqrt()) + 1e-6)
    if coef < 1.0:
        torch._foreach_mul_(grads, coef)


def plain_step(shape: GPTShape, device: torch.device):
    """The baseline step: plain module, same microbatches accumulated, global-norm clip, AdamW."""
    model = PlainGPT(shape).to(device)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD)
    data = batches(shape, device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for b in data:
            (plain_loss(model(b["tokens"]), b["labels"]) / len(data)).backward()
        _clip_global(params, CLIP)
        opt.step()

    return step


def torch_pipeline_step(shape: GPTShape, exits: dict[int, float], state: ParallelState):
    """``torch.distributed.pipelining`` 1F1B over ``PlainGPT`` stages (this rank's stage); no exits."""
    if exits:
        raise ValueError("the torch.distributed.pipelining baseline has no exit heads; pass exits={}")
    stage, n = state.pp_rank, state.pp
    module = PlainGPT(shape, stage=stage, num_stages=n).to(state.device)
    data = batches(shape, state.device)
    example = data[0]["tokens"] if stage == 0 else torch.zeros(shape.mbs, shape.seq, shape.hidden)
    pipe = PipelineStage(module, stage, n, state.device, input_args=(example,), group=state.pp_group)
    schedule = Schedule1F1B(pipe, shape.m, loss_fn=plain_loss)
    tokens = torch.cat([b["tokens"] for b in data])
    labels = torch.cat([b["labels"] for b in data])
    params = list(module.parameters())
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if stage == 0:
            schedule.step(tokens)
        elif stage == n - 1:
            # Our runtime keeps no outputs either: without this the logits of every microbatch are kept.
            schedule.step(target=labels, losses=[], return_outputs=False)
        else:
            schedule.step()
        _clip_global(params, CLIP, state.pp_group)
        opt.step()

    return step


# Runner name -> builder of its step on this rank. pp = 1: plain and ours; pp = 2: ours and torch.
RUNNERS = {
    "plain PyTorch": lambda shape, state: plain_step(shape, state.device),
    "ours": lambda shape, state: our_step(shape, {}, state),
    "ours, 2 exits": lambda shape, state: our_step(shape, EXITS, state),
    "torch Schedule1F1B": lambda shape, state: torch_pipeline_step(shape, {}, state),
}
PP_RUNNERS = {1: ["plain PyTorch", "ours", "ours, 2 exits"], 2: ["ours", "ours, 2 exits", "torch Schedule1F1B"]}


def _state(world: int) -> ParallelState:
    return ParallelState.build(ParallelDims.from_world(world, pp=world)) if world > 1 else ParallelState.single()


def _timing_worker(rank: int, world: int, shape: GPTShape, runners: list[str],
                   iters: int) -> dict[str, list[tuple[float, float]]]:
    """Build every runner on this rank, then time them in alternating rounds (one step each per round), so
    load from other processes hits all of them alike. Per step: (wall, CPU) seconds."""
    state = _state(world)
    steps = {name: RUNNERS[name](shape, state) for name in runners}
    sync = dist.barrier if world > 1 else None
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    for round_ in range(iters + 1):  # round 0 warms up
        for name, step in steps.items():
            t = time_step(step, sync)
            if round_:
                times[name].append(t)
    return times


def _memory_worker(rank: int, world: int, shape: GPTShape, runner: str) -> int:
    """Peak bytes of building ``runner`` and running two steps, in a fresh forked process."""
    PeakMemory.prepare_cpu_process()
    state = _state(world)
    # A throw-away step first: library code and lazily built state paged in now would otherwise count as
    # peak memory of the measured run.
    RUNNERS[runner](shape, state)()
    gc.collect()
    PeakMemory.release_free_memory()
    meter = PeakMemory(state.device)
    meter.start()
    step = RUNNERS[runner](shape, state)
    step()
    step()
    return meter.peak_bytes()


def _step_memory_worker(rank: int, world: int, shape: GPTShape, exits: dict[int, float], recompute: bool,
                        deallocate: bool) -> int:
    """Peak bytes above the memory held between steps (weights, gradients, optimizer state) during one
    training step, in a fresh forked process: the step's activations and temporaries."""
    PeakMemory.prepare_cpu_process()
    state = _state(world)
    step = our_step(shape, exits, state, deallocate, recompute)
    step()  # the optimizer state now exists and library code is paged in
    gc.collect()
    PeakMemory.release_free_memory()
    meter = PeakMemory(state.device)
    meter.start()
    step()
    return meter.peak_bytes()


# (pp, exits, full recompute): with recompute a stage keeps little but its inputs and outputs per microbatch.
MEMORY_CASES = [(2, {}, False), (2, EXITS, False), (4, {}, False), (4, EXITS, False), (4, {}, True)]


def measure_freed_outputs(shape: GPTShape, cases=MEMORY_CASES) -> list[dict]:
    """Per-stage activation memory with sent outputs kept against freed, for each ``(pp, exits,
    recompute)``; each configuration's two variants measured back to back."""
    out = []
    for pp, exits, recompute in cases:
        peaks = {dealloc: [p / MIB for p in run_distributed(_step_memory_worker, pp, shape, exits, recompute,
                                                             dealloc, timeout=900)]
                 for dealloc in (False, True)}
        out.append({"pp": pp, "exits": sorted(exits), "recompute": recompute, "kept_mib": peaks[False],
                    "freed_mib": peaks[True], "output_mib": shape.seq * shape.mbs * shape.hidden * 4 / MIB})
    return out


def measure(shape: GPTShape, pp: int, iters: int) -> list[dict]:
    """Every runner of ``pp``: step times (slowest rank per step) and per-rank peak memory."""
    timed = run_distributed(_timing_worker, pp, shape, PP_RUNNERS[pp], iters, timeout=900)
    out = []
    for name in PP_RUNNERS[pp]:
        wall = [max(r[name][i][0] for r in timed) for i in range(iters)]
        cpu = [max(r[name][i][1] for r in timed) for i in range(iters)]
        peaks = run_distributed(_memory_worker, pp, shape, name, timeout=900)
        t = statistics.median(wall)
        out.append({"runner": name, "pp": pp, "exits": sorted(EXITS) if "exits" in name else [], "step_s": t,
                    "cpu_step_s": statistics.median(cpu), "steps_s": wall, "cpu_steps_s": cpu,
                    "tokens_per_s": shape.tokens_per_step / t, "peak_mib": [p / MIB for p in peaks]})
    return out


def _row(r: dict, ref: dict) -> list:
    return [r["runner"], fmt(r["step_s"] * 1e3), fmt(r["cpu_step_s"] * 1e3), fmt(r["tokens_per_s"]),
            " / ".join(fmt(p) for p in r["peak_mib"]), f"{r['step_s'] / ref['step_s']:.2f}x",
            f"{r['cpu_step_s'] / ref['cpu_step_s']:.2f}x", f"{max(r['peak_mib']) / max(ref['peak_mib']):.2f}x"]


def _tables(runs: list[dict]) -> list[dict]:
    get = {(r["pp"], r["runner"]): r for r in runs}
    cols = ["runner", "step wall (ms)", "step CPU (ms)", "tokens/s", "peak memory (MiB, per stage)"]
    t1 = table("tp = pp = dp = 1, no exits: our step against a plain PyTorch loop",
               cols + ["wall vs plain", "CPU vs plain", "memory vs plain"],
               [_row(get[(1, n)], get[(1, "plain PyTorch")]) for n in ("plain PyTorch", "ours")])
    t2 = table("2 exits against none, pp = 1 and pp = 2",
               ["pp"] + cols + ["wall vs none", "CPU vs none", "memory vs none"],
               [[pp] + _row(get[(pp, n)], get[(pp, "ours")]) for pp in (1, 2) for n in ("ours", "ours, 2 exits")],
               [f"exits at layers {sorted(EXITS)} with weights {[EXITS[k] for k in sorted(EXITS)]}, one per stage at "
                "pp = 2, tied to the output layer (copies synchronised across stages)"])
    t3 = table("pp = 2, 1F1B: our pipeline runtime against torch.distributed.pipelining Schedule1F1B",
               cols + ["wall vs ours", "CPU vs ours", "memory vs ours"],
               [_row(get[(2, n)], get[(2, "ours")]) for n in ("ours", "torch Schedule1F1B")],
               ["torch: PlainGPT stages of the same sizes, same microbatches, AdamW and global-norm clipping"])
    return [t1, t2, t3]


def _memory_table(shape: GPTShape, runs: list[dict]) -> dict:
    rows = [[r["pp"], ", ".join(map(str, r["exits"])) or "none", "full" if r["recompute"] else "none", stage,
             fmt(kept), fmt(freed), fmt(kept - freed), f"{freed / kept:.2f}x" if kept else "-"]
            for r in runs for stage, (kept, freed) in enumerate(zip(r["kept_mib"], r["freed_mib"]))]
    return table("Activation memory per stage: sent outputs kept until backward against freed once sent",
                 ["pp", "exit layers", "recompute", "stage", "kept (MiB)", "freed (MiB)", "saved (MiB)",
                  "freed vs kept"], rows,
                 [f"peak memory of one 1F1B step above the memory held between steps (weights, gradients, optimizer "
                  f"state), per stage, {shape.m} microbatches; one sent output is {fmt(runs[0]['output_mib'])} MiB "
                  "([seq, micro batch, hidden] fp32) and 1F1B keeps up to pp - stage of them in flight; the last "
                  "stage sends nothing",
                  "kept: what the runtime did before (and EE-LLM does on stages with exits); freed: the data of an "
                  "output is dropped once sent, its autograd graph kept (Megatron's pseudo-deallocation); the "
                  "gradients of both are bit for bit equal (tests/dist/test_pipeline_runtime.py)"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = bench_parser(__doc__, "tiny model, few steps (a smoke run)")
    p.add_argument("--iters", type=int, default=None, help="timed steps per measurement")
    return parse_positive(p, argv, "iters")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    shape = QUICK if args.quick else FULL
    iters = args.iters or (2 if args.quick else 8)
    runs = measure(shape, 1, iters) + measure(shape, 2, iters)
    memory = measure_freed_outputs(shape, MEMORY_CASES[1:2] if args.quick else MEMORY_CASES)
    return {
        "name": "training",
        "title": "Training: throughput, exits, pipeline runtime",
        "quick": args.quick,
        "model": dict(vars(shape), tokens_per_step=shape.tokens_per_step),
        "runs": runs,
        "freed_outputs": memory,
        "tables": _tables(runs) + [_memory_table(shape, memory)],
        "notes": [
            f"model: {shape.layers} layers, hidden {shape.hidden}, {shape.heads} heads, seq {shape.seq}, vocab "
            f"{shape.vocab}, LayerNorm + learned positions + GELU, untied output layer, no dropout, fp32; "
            f"{shape.m} microbatches of {shape.mbs} sequences = {shape.tokens_per_step} tokens per step; "
            "seeded random token ids, identical for every runner",
            "one step = forward + backward over all microbatches, gradient finalisation, global-norm clip at "
            f"{CLIP}, AdamW (ours: the Megatron optimizer); {iters} timed rounds after one warm-up round, the "
            "runners of one table alternating step by step in the same processes; medians over the rounds, "
            "tokens/s from the wall-clock median; step CPU = the process's CPU time (busiest rank), which other "
            "processes' load does not inflate but which leaves out waiting on a pipeline peer",
            "every process is a forked gloo worker with one torch thread: pp = 1 uses one core, pp = 2 two",
            "peak memory: " + PeakMemory(torch.device("cpu")).method + "; counted from before the model is "
            "built, so it includes parameters, gradients, optimizer state and activations",
        ],
    }
