"""Measure the exits of a checkpoint against the model itself, and project what early exit gains with them.

    python tools/measure_exits.py --prompts bench/prompts/general.jsonl --tokens 96 --output-dir runs/exits \
        -- --load CKPT --use-checkpoint-args --tokenizer-type ... --tokenizer-model ...
    python tools/measure_exits.py --text held_out.jsonl --output-dir runs/exits -- ...

On the model's own greedy continuations of ``--prompts`` (what decoding produces; the positions of the
continuation are measured) or on the documents of ``--text`` (every position), each exit's teacher-forced
agreement with the final head, the calibration of its confidence (top-1 probability, over the model's exit
vocabulary when it has one) and of its learned estimator (when it has one), and, from the decoding costs
measured here (one layer, the head, an exit check: ``--threads`` torch threads), the projected speed-up and
fidelity of early exit at each threshold, plus the fastest choice of exits and threshold whose projected
fidelity stays above ``--min-fidelity``. Writes ``exits.json`` in ``--output-dir`` and prints the tables.
One process (tp = pp = 1: reshard a parallel checkpoint with tools/checkpoint/util.py first).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron.cli_errors import run_cli  # noqa: E402
from megatron.evaluation.exit_quality import calibration, exit_predictions, measure_costs, project, recommend  # noqa: E402
from megatron.evaluation.launch import build_model, split_argv  # noqa: E402
from megatron.text_generation.engine import InferenceEngine  # noqa: E402
from megatron.text_generation.generation import generate_tokens  # noqa: E402
from megatron.text_generation.request import EarlyExitParams, SamplingParams  # noqa: E402
from tools.sweep_thresholds import parse_thresholds, read_prompts  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="Prompts (.jsonl with 'text', or one a line) the model continues greedily.")
    src.add_argument("--text", help="Documents (.jsonl with 'text', or one a line) measured as they are.")
    p.add_argument("--tokens", type=int, default=96, help="Greedy tokens generated per prompt (with --prompts).")
    p.add_argument("--thresholds", default="0.9,0.8,0.7,0.6,0.5,0.4,0.3", help="Thresholds to project.")
    p.add_argument("--min-fidelity", type=float, default=0.9, help="Fidelity floor of the recommendation.")
    p.add_argument("--max-exits", type=int, default=3, help="Most exits the recommendation may use.")
    p.add_argument("--threads", type=int, default=1, help="Torch threads while timing the decoding costs.")
    p.add_argument("--output-dir", required=True)
    ns = p.parse_args(argv)
    ns.thresholds = parse_thresholds(ns.thresholds)
    if ns.tokens < 1 or not 0 <= ns.min_fidelity <= 1 or ns.max_exits < 1 or ns.threads < 1:
        raise ValueError("--tokens, --max-exits and --threads must be >= 1 and --min-fidelity in [0, 1]")
    return ns


def sequences(model, ns) -> tuple[list[list[int]], list[int]]:
    tok = model.tokenizer
    if ns.text:
        docs = [tok.tokenize(t) for t in read_prompts(ns.text)]
        return docs, [0] * len(docs)
    prompts = [tok.tokenize(t) for t in read_prompts(ns.prompts)]
    engine = InferenceEngine(model.chunks, model.state, tok, model.run.model, model.run.early_exit)
    out = generate_tokens(engine, prompts, SamplingParams(tokens_to_generate=ns.tokens, greedy=True), EarlyExitParams())
    # position len(prompt) - 1 predicts the first generated token
    return [p + g for p, g in zip(prompts, out.tokens)], [len(p) - 1 for p in prompts]


def report(preds, costs, num_layers: int, ns) -> dict:
    exits = {}
    for layer in preds.exits:
        agree = preds.agree(layer)
        row = {"agreement": preds.agreement(layer), "confidence": calibration(preds.confidence[layer], agree)}
        if layer in preds.estimate:
            row["estimator"] = calibration(torch.sigmoid(preds.estimate[layer]), agree)
        row["fires"] = {str(t): {"share": float((preds.confidence[layer] >= t).float().mean()),
                                 "precision": float(agree[preds.confidence[layer] >= t].float().mean())
                                 if bool((preds.confidence[layer] >= t).any()) else None}
                        for t in ns.thresholds}
        exits[str(layer)] = row
    projections = [vars(project(preds, preds.exits, t, costs, num_layers)) for t in ns.thresholds]
    floors = (None, 0.1, 0.2, 0.3, 0.5) if preds.estimate else (None,)
    best = recommend(preds, costs, num_layers, min_fidelity=ns.min_fidelity, thresholds=ns.thresholds,
                     max_exits=ns.max_exits, floors=floors)
    return {"positions": len(preds.final), "exits": exits, "costs_s": vars(costs), "costs_in_layers": costs.as_layers(),
            "projection_all_exits": projections, "recommended": vars(best) if best else None,
            "min_fidelity": ns.min_fidelity}


def print_tables(r: dict) -> None:
    print(f"\nteacher-forced agreement with the final head ({r['positions']} positions)")
    print(f"{'exit':>5} | {'agreement':>9} | {'conf. ECE':>9}" + " | fires/precision at " +
          " ".join(f"{t}" for t in next(iter(r["exits"].values()))["fires"]) if r["exits"] else "")
    for layer, row in r["exits"].items():
        fires = " ".join(f"{v['share']:.2f}/{v['precision']:.2f}" if v["precision"] is not None else f"{v['share']:.2f}/-"
                         for v in row["fires"].values())
        print(f"{layer:>5} | {row['agreement']:9.3f} | {row['confidence']['ece']:9.3f} | {fires}")
    c = r["costs_in_layers"]
    print(f"\ncosts per token (in layers): head {c['head']:.2f}, exit check {c['check']:.2f}, "
          f"estimator {c['estimator']:.3f}")
    print(f"{'threshold':>9} | {'projected speed-up':>18} | {'fidelity':>8} | exit shares")
    for p in r["projection_all_exits"]:
        shares = " ".join(f"{k}:{v:.2f}" for k, v in p["share"].items())
        print(f"{p['threshold']:9.2f} | {p['speedup']:17.2f}x | {p['fidelity']:8.3f} | {shares}")
    best = r["recommended"]
    if best is None:
        print(f"\nno choice of exits and threshold keeps the projected fidelity >= {r['min_fidelity']}")
    elif best["speedup"] <= 1.0:
        print(f"\nearly exit does not pay with these exits: the fastest choice with fidelity >= {r['min_fidelity']} "
              f"(exit_layers {list(best['exits'])}, threshold {best['threshold']}) projects {best['speedup']:.2f}x")
    else:
        floor = "" if best["estimator_floor"] is None else f", estimator_floor {best['estimator_floor']}"
        print(f"\nrecommended: exit_layers {list(best['exits'])}, threshold {best['threshold']}{floor}: projected "
              f"{best['speedup']:.2f}x at fidelity {best['fidelity']:.3f} (the fastest with fidelity >= "
              f"{r['min_fidelity']})")


def main(argv=None) -> int:
    own, model_argv = split_argv(argv)
    ns = parse(own)
    model = build_model(model_argv)
    if model.state.dims.world_size != 1:
        raise ValueError("tools/measure_exits.py runs in one process: reshard with tools/checkpoint/util.py to "
                         "tp = pp = 1 first")
    chunk = model.chunks[0]
    if not model.run.early_exit.exit_layer_nums:
        raise ValueError("the model has no exits (--exit-layer-nums): nothing to measure")
    ee = model.run.early_exit
    vocab = chunk.exit_vocabulary() if ee.exit_vocab_size else None
    estimator = chunk.exit_estimate if ee.exit_estimator else None
    seqs, starts = sequences(model, ns)
    preds = exit_predictions(chunk, seqs, starts, exit_vocab=vocab, estimator=estimator)
    torch.set_num_threads(ns.threads)
    costs = measure_costs(chunk, exit_vocab_size=ee.exit_vocab_size or None,
                          estimator_layer=ee.exit_layer_nums[0] if estimator is not None else None)
    r = report(preds, costs, model.run.model.num_layers, ns)
    os.makedirs(ns.output_dir, exist_ok=True)
    with open(os.path.join(ns.output_dir, "exits.json"), "w") as f:
        json.dump(r, f, indent=1)
    print_tables(r)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
