"""Self-speculative decoding benchmark: tokens/s against full-depth greedy decoding of the same model in
the same run, with the acceptance rate, for each draft exit and number of speculated tokens.

Models: the quick-start model (``examples/quickstart.sh``: 6 layers, hidden 128, exits after layers 2
and 4, a 4096-piece SentencePiece vocabulary). With ``--load DIR`` (its ``runs/quickstart/checkpoint``)
the trained model is served as trained (``--pp`` processes over gloo, the checkpoint's pipeline size;
its tokenizer from ``--tokenizer-model``, by default next to the checkpoint); without it, random weights
of the same shape (init std 0.02, NullTokenizer of the same vocabulary size). A full run adds a deeper
random model (12 layers, hidden 256, exits after layers 3, 6 and 9), where the layers rather than the
per-call overheads and the vocabulary head dominate a step. Greedy output must equal
full depth's (the "same tokens" column). Follows bench/common.py (``main(argv) -> dict``); run directly
it writes bench/results/speculative.json and prints the table.

    python bench/bench_speculative.py [--quick] [--tokens 48] [--load runs/quickstart/checkpoint --pp 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import fmt, machine_info, save_and_print, table  # noqa: E402
from megatron.testing.distributed import run_distributed  # noqa: E402
from megatron.text_generation.engine import InferenceEngine  # noqa: E402
from megatron.text_generation.generation import generate_tokens  # noqa: E402
from megatron.text_generation.request import EarlyExitParams, SamplingParams  # noqa: E402
from megatron.checkpoint.model_loader import load_inference_model  # noqa: E402
from megatron.text_generation.server_launch import server_args  # noqa: E402

RESULT = Path(__file__).resolve().parent / "results" / "speculative.json"
VOCAB = 4096  # examples/quickstart.sh's SentencePiece vocabulary
PROMPTS = ["And God said, Let there be light: and there was light.",
           "In the beginning God created the heaven and the earth.",
           "Blessed are the meek: for they shall inherit the earth."]
QUICKSTART = dict(layers=6, hidden=128, heads=4, exits=(2, 4))
DEEPER = dict(layers=12, hidden=256, heads=8, exits=(3, 6, 9))


def _flags(args, shape: dict | None) -> list[str]:
    common = ["--device", "cpu"]
    if shape is None:  # the trained checkpoint brings its own shape
        tokenizer = [f"--{name.replace('_', '-')}={getattr(args, name)}"
                     for name in ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file")
                     if getattr(args, name) is not None]
        return common + ["--load", args.load, "--use-checkpoint-args", *tokenizer]
    return common + ["--random-weights", "--num-layers", str(shape["layers"]), "--hidden-size", str(shape["hidden"]),
                     "--num-attention-heads", str(shape["heads"]), "--seq-length", "128",
                     "--max-position-embeddings", "128", "--exit-layer-nums", *map(str, shape["exits"]),
                     "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB - 1),
                     "--init-method-std", "0.02", "--hidden-dropout", "0.0", "--attention-dropout", "0.0"]


def _prompts(tok, trained: bool) -> list[list[int]]:
    if trained:
        return [tok.tokenize(p) for p in PROMPTS]
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB - 1, (12,), generator=g).tolist() for _ in PROMPTS]


def _result(outs, times) -> dict:
    tokens = [o.tokens[0] for o in outs]
    stats = [o.extra["speculative"] for o in outs if "speculative" in o.extra]
    drafted = sum(st["drafted"] for st in stats)
    return {"tokens_per_s": sum(map(len, tokens)) / statistics.median(times), "tokens": tokens,
            "acceptance_rate": sum(st["accepted"] for st in stats) / drafted if drafted else None}


def _measure(args, shape: dict | None) -> list[dict]:
    """Every rank builds the model and runs the same requests; stage 0's numbers are returned. The
    decodings take turns within each repetition, so a change in the machine's load hits them alike."""
    torch.set_num_threads(1)
    run, state, tok, chunks = load_inference_model(server_args(_flags(args, shape)))
    eng = InferenceEngine(chunks, state, tok, run.model, run.early_exit)
    prompts = _prompts(tok, shape is None)
    runs = [dict(decoding="full depth", draft_exit=None, k=None, ee=EarlyExitParams())]
    for layer in run.early_exit.exit_layer_nums:
        for k in args.ks:
            runs.append(dict(decoding="self-speculative", draft_exit=layer, k=k, ee=EarlyExitParams(
                decoding="speculative", draft_exit_layer=layer, num_speculative_tokens=k)))
    sampling = SamplingParams(tokens_to_generate=args.tokens, greedy=True)
    times, outs = [[] for _ in runs], [None] * len(runs)
    for r in runs:  # warm-up
        generate_tokens(eng, prompts[:1], SamplingParams(tokens_to_generate=4, greedy=True), r["ee"])
    for _ in range(args.iters):
        for i, r in enumerate(runs):
            start = time.perf_counter()
            outs[i] = [generate_tokens(eng, [p], sampling, r["ee"]) for p in prompts]  # batch 1: latency
            times[i].append(time.perf_counter() - start)
    return [dict({k: v for k, v in r.items() if k != "ee"}, **_result(o, t)) for r, o, t in zip(runs, outs, times)]


def _worker(rank, world, args):
    os.environ["WORLD_SIZE"], os.environ["RANK"] = str(world), str(rank)  # what server_args checks
    return _measure(args, None)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (quick-start shape only)")
    p.add_argument("--out", default=None, help="unused (no pictures); kept for bench/common.py's convention")
    p.add_argument("--tokens", type=int, default=None, help="greedy tokens per prompt")
    p.add_argument("--iters", type=int, default=None, help="timed repetitions (median)")
    p.add_argument("--ks", type=int, nargs="+", default=None, help="numbers of speculated tokens to try")
    p.add_argument("--load", default=None, help="the quick-start checkpoint (runs/quickstart/checkpoint)")
    p.add_argument("--pp", type=int, default=2, help="pipeline size of the --load checkpoint (quickstart.sh: 2)")
    p.add_argument("--tokenizer-type", default="SentencePieceTokenizer", help="tokenizer of --load")
    p.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece model of --load (default: DIR/../data/sp4096/kjv_sp.model)")
    p.add_argument("--vocab-file", default=None, help="GPT-2 BPE tokenizers: vocabulary of --load")
    p.add_argument("--merge-file", default=None, help="GPT-2 BPE tokenizers: merges of --load")
    args = p.parse_args(argv)
    if args.load is not None and args.tokenizer_model is None and args.tokenizer_type == "SentencePieceTokenizer":
        args.tokenizer_model = str(Path(args.load).resolve().parent / "data" / f"sp{VOCAB}" / "kjv_sp.model")
    args.tokens = args.tokens or (12 if args.quick else 48)
    args.iters = args.iters or (1 if args.quick else 3)
    args.ks = args.ks or ([3] if args.quick else [2, 4, 6])
    return args


def _cells(name: str, rows: list[dict]) -> list[list]:
    base, cells = rows[0], []
    for r in rows:
        same = "yes" if r["tokens"] == base["tokens"] else "no"
        rate = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.0%}"
        cells.append([name, r["decoding"], r["draft_exit"] or "-", r["k"] or "-", fmt(r["tokens_per_s"]), rate,
                      f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x", same])
    return cells


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    models = {}
    if args.load is not None:
        models[f"{args.load}, trained"] = run_distributed(_worker, args.pp, args, timeout=900)[0]
    else:
        models["quick-start shape, random"] = _measure(args, QUICKSTART)
    if not args.quick:
        models["12 layers h256, random"] = _measure(args, DEEPER)
    cells = [c for name, rows in models.items() for c in _cells(name, rows)]
    strip = {name: [{k: v for k, v in r.items() if k != "tokens"} for r in rows] for name, rows in models.items()}
    return {
        "name": "speculative",
        "title": "Self-speculative decoding: tokens/s and acceptance rate against full depth",
        "quick": args.quick,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": machine_info(),
        "models": strip,
        "tables": [table("Greedy decoding, batch 1", ["model", "decoding", "draft exit", "speculated k", "tokens/s",
                                                      "acceptance rate", "speed vs full depth", "same tokens"], cells)],
        "notes": [
            f"{len(PROMPTS)} prompts decoded one at a time, {args.tokens} greedy tokens each; tokens/s = generated "
            f"tokens / median wall time of {args.iters} runs after a warm-up, the decodings taking turns within each run; "
            "one thread per process, fp32",
            "random weights use init std 0.02 (Megatron's default): an untrained model's layers change the hidden "
            "state little, so exits agree with the final head far more often than in a trained model",
            "a round is k draft forwards (layers up to the draft exit, its head) and one verify forward of the "
            "remaining layers over the round's positions; it commits the agreeing drafts plus one full-model token",
            "with --load and pp = 2, drafts from an exit on stage 0 never cross the pipeline, while every "
            "full-depth token does",
            "on these tiny CPU models per-call overheads and the vocabulary projection (which every draft also "
            "pays) weigh as much as the layers: speculation pays off with a deep trunk behind the draft exit "
            "and high acceptance",
        ],
    }


if __name__ == "__main__":
    save_and_print(main(sys.argv[1:]), RESULT)
