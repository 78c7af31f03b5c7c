"""Pipeline-schedule benchmark: simulated makespan and bubble fraction of 1F1B, early-exit 1F1B and
early-exit bubble filling for EE-LLM's 1.3B and 7B configurations at pp = 4, with stage costs measured here.

Costs. Each pipeline stage of the model (our ``EarlyExitGPTModel`` chunk for stage ``s`` of 4, Llama
architecture as in EE-LLM's scripts, pre-exits) is built at a shrunk size and its training forward and
backward are timed on this machine: hidden size, FFN size, sequence length and vocabulary are all divided
by the same factor ``k`` (heads keep 64 channels where they can), layers per stage and micro batch size
are kept. Every per-token cost (qkv/dense ``4h^2``, SwiGLU ``3hf``, attention ``2sh``, head ``hV``) then
shrinks by ``k^2``, so the ratios between a layer, an exit head, the final head and the embedding stay
those of the real model up to kernel efficiency at small sizes; absolute times are not a GPU's. A
chunk without exits gives the stage's backbone cost; the same chunk with its exit minus that gives the
exit head's cost. Schedules are simulated with these costs in units of one layer's forward.

Microbatches: EE-LLM's global batch 2048 over dp 4 (16 GPUs at tp 1, pp 4) gives 128 microbatches of 4
(1.3B) and 256 of 2 (7B); a short step of 8 microbatches, where bubbles matter most, is simulated too
(and drawn).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass

import torch

from bench.common import bench_parser, fmt, parse_positive, table
from megatron.config import EarlyExitConfig, ModelConfig
from megatron.core.parallel_state import ParallelState
from megatron.core.pipeline_parallel.schedules import (
    Costs,
    early_exit_bubble_filling,
    one_f_one_b,
    simulate,
    validate,
)
from megatron.model import EarlyExitGPTModel
from megatron.model.partition import partition as make_partition

__all__ = ["main", "EE_LLM", "LLMConfig"]

PP = 4


@dataclass(frozen=True)
class LLMConfig:
    """One of EE-LLM's training configurations (its ``examples/ee_training/*.sh``)."""

    name: str
    layers: int
    hidden: int
    heads: int
    ffn: int
    seq: int
    mbs: int
    vocab: int
    exits: tuple[int, ...]
    tied: bool
    m: int  # microbatches per step: global batch 2048 / (mbs * dp 4)

    @property
    def exit_layer_flop_ratio(self) -> float:
        """Matmul FLOPs of an exit head's projection over one layer's (per token; the same after shrinking
        up to rounding): ``hV / (4h^2 + 3hf + 2sh)`` with SwiGLU's three ``h x f`` matrices."""
        h = self.hidden
        return h * self.vocab / (4 * h * h + 3 * h * self.ffn + 2 * self.seq * h)

    def shrunk(self, k: int) -> "LLMConfig":
        hidden = self.hidden // k
        heads = max(1, min(self.heads, hidden // 64)) if hidden >= 64 else 1
        return LLMConfig(self.name, self.layers, hidden, heads, max(1, round(self.ffn / k)), max(1, self.seq // k),
                         self.mbs, max(2, round(self.vocab / k)), self.exits, self.tied, self.m)


EE_LLM = (
    LLMConfig("1.3B", 24, 2048, 32, 5440, 2048, 4, 32000, (7, 13), True, 128),
    LLMConfig("7B", 32, 4096, 32, 10880, 2048, 2, 32000, (9, 17), False, 256),
)


def _configs(c: LLMConfig, with_exits: bool) -> tuple[ModelConfig, EarlyExitConfig]:
    model = ModelConfig(num_layers=c.layers, hidden_size=c.hidden, num_attention_heads=c.heads, ffn_hidden_size=c.ffn,
                        seq_length=c.seq, vocab_size=c.vocab, make_vocab_size_divisible_by=1, normalization="RMSNorm",
                        swiglu=True, position_embedding_type="rope", add_bias_linear=False, hidden_dropout=0.0,
                        attention_dropout=0.0, untie_embeddings_and_output_weights=not c.tied)
    exits = list(c.exits) if with_exits else []
    ee = EarlyExitConfig(exit_layer_nums=exits, exit_layer_weight=[1.0] * len(exits), pre_exit=True,
                         untie_exit_output_weights=not c.tied)
    return model, ee


def _stage_step(c: LLMConfig, stage: int, with_exits: bool):
    """A function timing one microbatch's (forward, backward) through ``stage``'s chunk: the backward of
    the stage output with a ones gradient plus its exit losses, as in the pipeline. CPU time of this
    process (one thread): the work itself, not the load other processes put on the machine."""
    model_cfg, ee = _configs(c, with_exits)
    part = make_partition(c.layers, PP, 1, ee.exit_layer_nums)
    chunk = EarlyExitGPTModel(model_cfg, ee, state=ParallelState.single(), partition=part, stage=stage)
    g = torch.Generator().manual_seed(stage)
    tokens = torch.randint(0, c.vocab, (c.mbs, c.seq), generator=g)
    labels = torch.randint(0, c.vocab, (c.mbs, c.seq), generator=g)

    def run() -> tuple[float, float]:
        hidden = None if chunk.spec.has_embedding else torch.randn(c.seq, c.mbs, c.hidden, requires_grad=True)
        t0 = time.process_time()
        out = chunk(input_ids=tokens if chunk.spec.has_embedding else None, labels=labels, hidden_states=hidden)
        t1 = time.process_time()
        losses = [v.mean() for v in out.exit_losses.values()]
        if chunk.spec.has_head:
            roots, grads = [out.output.mean()] + losses, None
        else:
            roots, grads = [out.output] + losses, [torch.ones_like(out.output)] + [None] * len(losses)
        t2 = time.process_time()
        torch.autograd.backward(roots, grads)
        return t1 - t0, time.process_time() - t2

    return run


def measure_costs(c: LLMConfig, reps: int) -> dict:
    """Per-stage backbone costs, the exit head cost and derived per-layer figures (seconds).

    Every chunk is timed once per round, rounds alternating over the chunks. A stage's cost is the best of
    ``reps`` rounds (interference only ever adds time); an exit head's cost is the median over rounds of
    (chunk with the exit - same chunk without) measured back to back, which cancels slow drifts that a
    difference of two independent minima would not."""
    part = make_partition(c.layers, PP, 1, list(c.exits))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small kernels on several threads time the OpenMP pool, not the model
    try:
        # A stage's chunk with its exit right after the one without: the pair is timed back to back.
        keys = [(s, e) for s in range(PP) for e in (False, True) if not e or s in part.exit_stages]
        runs = {(s, e): _stage_step(c, s, e) for s, e in keys}
        samples = {key: [] for key in runs}
        for round_ in range(reps + 1):  # round 0 warms up
            for key, run in runs.items():
                t = run()
                if round_:
                    samples[key].append(t)
    finally:
        torch.set_num_threads(threads)
    plain = [(min(f for f, _ in samples[(s, False)]), min(b for _, b in samples[(s, False)])) for s in range(PP)]
    exit_extra = [[statistics.median(w[i] - wo[i] for w, wo in zip(samples[(s, True)], samples[(s, False)]))
                   / len(part.spec(s).exits) for i in (0, 1)] for s in part.exit_stages]
    per_stage = c.layers // PP
    return {
        "stage_forward_s": [p[0] for p in plain],
        "stage_backward_s": [p[1] for p in plain],
        "layer_forward_s": plain[1][0] / per_stage,
        "layer_backward_s": plain[1][1] / per_stage,
        "exit_forward_s": max(0.0, statistics.mean(e[0] for e in exit_extra)),
        "exit_backward_s": max(0.0, statistics.mean(e[1] for e in exit_extra)),
        "final_head_forward_s": plain[PP - 1][0] - plain[1][0],
        "final_head_backward_s": plain[PP - 1][1] - plain[1][1],
        "exit_stages": list(part.exit_stages),
        "exit_positions": [part.owner(x).stage for x in c.exits],
        "exit_layer_flop_ratio": c.exit_layer_flop_ratio,
    }


def simulate_schedules(costs: dict, m: int) -> list[dict]:
    """1F1B without exits, with exits, and bubble filling, in units of one layer's forward."""
    unit = costs["layer_forward_s"]
    f = [x / unit for x in costs["stage_forward_s"]]
    b = [x / unit for x in costs["stage_backward_s"]]
    plain = Costs(forward=f, backward=b)
    ee = Costs(forward=f, backward=b, exit_forward=costs["exit_forward_s"] / unit,
               exit_backward=costs["exit_backward_s"] / unit)
    ratio = costs["layer_backward_s"] / unit
    exits = costs["exit_positions"]
    runs = [("1F1B, no exits", one_f_one_b(PP, m), plain),
            ("early-exit 1F1B", one_f_one_b(PP, m, exits), ee),
            ("early-exit bubble filling", early_exit_bubble_filling(PP, m, exits, None, None, ratio, ee), ee)]
    out = []
    for name, schedule, cost in runs:
        validate(schedule)
        r = simulate(schedule, cost)
        h = schedule.header
        out.append({"schedule": name, "m": m, "makespan_units": r.makespan, "makespan_s": r.makespan * unit,
                    "bubble_fraction": r.bubble_fraction, "fill_warmup": len(h.fill_warmup),
                    "fill_cooldown": len(h.fill_cooldown), "_schedule": schedule, "_result": r})
    return out


def _draw(runs: list[dict], model: str, out_dir: str) -> list[str]:
    from tools.show_schedule import draw

    paths = []
    for r in runs:
        slug = r["schedule"].split(",")[0].replace(" ", "_").replace("-", "_")
        path = os.path.join(out_dir, f"schedule_{model}_{slug}_m{r['m']}.png")
        draw(r["_schedule"], r["_result"], path)
        paths.append(path)
    return paths


def _cost_table(rows: list[tuple[LLMConfig, LLMConfig, int, dict]]) -> dict:
    body = []
    for full, small, k, c in rows:
        ms = 1e3
        shrunk = f"1/{k}: h {small.hidden}, ffn {small.ffn}, s {small.seq}, V {small.vocab}, b {small.mbs}"
        body.append([full.name, shrunk,
                     f"{fmt(c['layer_forward_s'] * ms)} / {fmt(c['layer_backward_s'] * ms)}",
                     f"{fmt(c['exit_forward_s'] * ms)} / {fmt(c['exit_backward_s'] * ms)}",
                     f"{fmt(c['final_head_forward_s'] * ms)} / {fmt(c['final_head_backward_s'] * ms)}",
                     " / ".join(fmt(x * ms) for x in c["stage_forward_s"]),
                     f"{c['layer_backward_s'] / c['layer_forward_s']:.2f}",
                     f"{c['exit_forward_s'] / c['layer_forward_s']:.2f}", f"{full.exit_layer_flop_ratio:.2f}"])
    return table("Measured costs per microbatch (shrunk models, ms): forward / backward",
                 ["model", "shrunk to", "layer", "exit head", "final norm + head", "stage forward 0 / 1 / 2 / 3",
                  "layer bwd/fwd", "exit fwd / layer fwd", "exit / layer matmul FLOPs (full size)"], body,
                 ["exit head: (stage chunk with its exit) - (same chunk without); final head: last stage - a "
                  "middle stage; the embedding is in stage 0's cost",
                  "the FLOP column is the real model's ratio: a measured ratio above it is the softmax / cross-entropy "
                  "work, which does not shrink with the hidden size and so weighs more at the shrunk width"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = bench_parser(__doc__, "tiny shrunk models, one timing round (a smoke run)",
                     "directory for the schedule pictures",
                     os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--shrink", type=int, default=None, help="divide hidden/ffn/seq/vocab by this (default 16)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds per stage (default 9)")
    p.add_argument("--no-pictures", action="store_true", help="skip the PNG timelines (no matplotlib needed)")
    return parse_positive(p, argv, "shrink", "reps")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    k = args.shrink or (128 if args.quick else 16)
    reps = args.reps or (1 if args.quick else 9)
    os.makedirs(args.out, exist_ok=True)
    cost_rows, sim_rows, results, pictures = [], [], [], []
    for full in EE_LLM:
        small = full.shrunk(k)
        costs = measure_costs(small, reps)
        cost_rows.append((full, small, k, costs))
        for m in ([8] if args.quick else [8, full.m]):
            runs = simulate_schedules(costs, m)
            # A quick run draws one model's pictures: enough to exercise the drawing, a third of its cost.
            if m == 8 and not args.no_pictures and not (args.quick and pictures):
                pictures += _draw(runs, full.name, args.out)
            base = runs[0]["makespan_units"]
            for r in runs:
                sim_rows.append([full.name, m, r["schedule"], fmt(r["makespan_units"]), fmt(r["makespan_s"] * 1e3),
                                 f"{r['bubble_fraction']:.1%}", f"{r['makespan_units'] / base:.3f}",
                                 f"{r['fill_warmup']} / {r['fill_cooldown']}" if "filling" in r["schedule"] else "-"])
            public = [{key: v for key, v in r.items() if not key.startswith("_")} for r in runs]
            results.append({"model": full.name, "m": m, "runs": public})
    sims = table("Simulated step at pp = 4 with the measured costs",
                 ["model", "microbatches", "schedule", "makespan (layer fwd units)", "makespan (ms, shrunk)",
                  "bubble fraction", "vs 1F1B no exits", "fills placed (warm-up / cool-down)"], sim_rows,
                 ["bubble fraction = idle stage-time / (pp x makespan); fill work counts as busy",
                  "bubble filling plans its fills with the same measured costs and never lengthens the step"])
    return {
        "name": "schedules",
        "title": "Pipeline schedules: EE-LLM 1.3B and 7B at pp = 4",
        "quick": args.quick,
        "shrink": k,
        "costs": [{"model": f.name, "shrunk": vars(s), **c} for f, s, _, c in cost_rows],
        "simulations": results,
        "pictures": [os.path.relpath(p, args.out) for p in pictures],
        "tables": [_cost_table(cost_rows), sims],
        "notes": [
            f"costs = CPU time of this process with one torch thread over {reps} alternating rounds after one "
            "warm-up (stages: best round; exit heads: median of paired differences); "
            f"sizes divided by {k} (module docstring: ratios kept, absolute times are not a GPU's)",
            "EE-LLM configurations: 1.3B = 24 layers, h 2048, ffn 5440, tied, pre-exits 7 and 13, micro batch 4; "
            "7B = 32 layers, h 4096, ffn 10880, untied, pre-exits 9 and 17, micro batch 2; seq 2048, vocab 32000",
            "pictures (m = 8): " + (", ".join(os.path.basename(p) for p in pictures) or "none"),
        ],
    }
