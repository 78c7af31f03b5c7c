"""Early-exit decoding benchmark: tokens/s and average exit layer against the threshold, next to
full-depth decoding of the same model in the same run, for method A (KV recomputation, one process) and
method B (pipeline-based, pp = 2 over gloo via run_distributed).

The model has random weights (a larger init std so that exits are sometimes confident); the numbers show
the mechanics and overheads of each method on this machine, not the quality of a trained model.
Follows bench/common.py's convention (``main(argv) -> dict``); run directly it writes
bench/results/inference.json and prints the markdown table.

    python bench/bench_inference.py [--quick] [--tokens 32] [--layers 8] [--hidden 128]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import fmt, machine_info, save_and_print, table  # noqa: E402
from megatron.config import EarlyExitConfig, ModelConfig  # noqa: E402
from megatron.core.parallel_state import ParallelDims, ParallelState  # noqa: E402
from megatron.model import EarlyExitGPTModel  # noqa: E402
from megatron.testing.distributed import run_distributed  # noqa: E402
from megatron.text_generation.engine import InferenceEngine  # noqa: E402
from megatron.text_generation.generation import generate_tokens  # noqa: E402
from megatron.text_generation.request import EarlyExitParams, SamplingParams  # noqa: E402
from megatron.tokenizer.null import NullTokenizer  # noqa: E402

THRESHOLDS = (1.0, 0.8, 0.6, 0.4, 0.2)
RESULT = Path(__file__).resolve().parent / "results" / "inference.json"


def _configs(args):
    exits = list(range(2, args.layers, 2))
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=4, vocab_size=args.vocab,
                      make_vocab_size_divisible_by=64, seq_length=args.prompt + args.tokens, normalization="RMSNorm",
                      swiglu=True, position_embedding_type="rope", add_bias_linear=False, hidden_dropout=0.0,
                      attention_dropout=0.0, untie_embeddings_and_output_weights=True, init_method_std=0.2, seed=7)
    return cfg, EarlyExitConfig(exit_layer_nums=exits, use_exit_norm=True)


def _run(eng, args, ee: EarlyExitParams) -> dict:
    g = torch.Generator().manual_seed(1)
    prompt = [torch.randint(0, args.vocab, (args.prompt,), generator=g).tolist()]
    sampling = SamplingParams(tokens_to_generate=args.tokens, greedy=True)
    generate_tokens(eng, prompt, SamplingParams(tokens_to_generate=2, greedy=True), ee)  # warm-up
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        out = generate_tokens(eng, prompt, sampling, ee)
        times.append(time.perf_counter() - start)
    layers = out.exit_layers[0]
    return {"tokens_per_s": len(layers) / statistics.median(times), "avg_exit_layer": sum(layers) / len(layers),
            "early_share": sum(layer < eng.num_layers for layer in layers) / len(layers), "tokens": out.tokens[0]}


def _sweep(eng, args, method: str) -> list[dict]:
    rows = [dict(method=method, threshold=None, **_run(eng, args, EarlyExitParams()))]
    for thres in THRESHOLDS:
        ee = EarlyExitParams(use_early_exit=True, early_exit_thres=thres, method=method)
        rows.append(dict(method=method, threshold=thres, **_run(eng, args, ee)))
    return rows


def _engine(args, state):
    cfg, ee = _configs(args)
    return InferenceEngine([EarlyExitGPTModel(cfg, ee, state=state)], state, NullTokenizer(args.vocab), cfg, ee)


def _pipeline_worker(rank, world, args):
    torch.set_num_threads(1)
    return _sweep(_engine(args, ParallelState.build(ParallelDims(pp=2))), args, "pipeline")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    p.add_argument("--out", default=None, help="unused (no pictures); kept for bench/common.py's convention")
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--iters", type=int, default=None)
    args = p.parse_args(argv)
    args.tokens = args.tokens or (8 if args.quick else 32)
    args.iters = args.iters or (1 if args.quick else 3)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    rows = _sweep(_engine(args, ParallelState.single()), args, "recompute")
    rows += run_distributed(_pipeline_worker, 2, args, timeout=600)[0]
    full = rows[0]["tokens"]
    cells = []
    for r in rows:
        thres = "full depth (no exits)" if r["threshold"] is None else f"{r['threshold']:.1f}"
        method = "A: KV recomputation, pp=1" if r["method"] == "recompute" else "B: pipeline-based, pp=2"
        cells.append([method, thres, fmt(r["tokens_per_s"]), f"{r['avg_exit_layer']:.2f} / {args.layers}",
                      f"{r['early_share']:.0%}", "yes" if r["tokens"] == full else "no"])
    meta = {k: v for k, v in vars(args).items() if k != "out"}
    exits = _configs(args)[1].exit_layer_nums
    return {
        "name": "inference",
        "title": "Early-exit inference: tokens/s and exit depth against threshold",
        "quick": args.quick,
        "config": meta,
        "machine": machine_info(),
        "rows": [{k: v for k, v in r.items() if k != "tokens"} for r in rows],
        "tables": [table("Greedy decoding of one prompt", ["method", "threshold", "tokens/s", "avg exit layer",
                                                           "tokens exited early", "same tokens as full depth"],
                         cells)],
        "notes": [
            f"model: {args.layers} layers (exits after layers {exits}, exit norm), hidden {args.hidden}, vocab "
            f"{args.vocab}, Llama-style, random weights (init std 0.2), fp32, one thread per process",
            f"prompt of {args.prompt} seeded random ids, {args.tokens} greedy tokens; tokens/s = generated tokens / "
            f"median wall time of {args.iters} runs after a warm-up (method B: measured on stage 0)",
            "method A skips the layers after an exit and back-fills their KV on the next full-depth pass; "
            "method B runs every layer and overlaps the next token on stage 0 with the rest of the pipeline",
        ],
    }


if __name__ == "__main__":
    save_and_print(main(sys.argv[1:]), RESULT)
