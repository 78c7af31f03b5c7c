"""Early exit on a real LLM: SmolLM2-135M with tuned exits, decoded greedily at batch 1 with one torch
thread, every mode side by side with our full depth in the same run, on prompts that are not tuning data.

Runners: Hugging Face ``generate`` on the same weights (``LlamaForCausalLM`` built from the checkpoint in
memory), our full depth, early exit (each confidence measure asked, each threshold, the exits asked), and
self-speculative decoding (each draft exit and number of drafted tokens). For every prompt each runner
is timed right after our full depth (pairs, so that other load on the machine hits both alike), each
timing the fastest of ``--repeats``; a runner's ratio is its total tokens/s over full depth's in its own
pairs. Quality, judged against the full model: **fidelity** is the share of generated tokens equal to the
full model's own choice on the same prefix (teacher-forced; 1.0 for lossless modes), **NLL** the full
model's mean negative log-likelihood of the generated tokens, **same** the share of positions equal to
full depth's output (free-running). Also written: a speed-against-fidelity plot.

The model: ``--load`` (default ``$EE_SMOLLM2_TUNED``, else ``examples/ee_tuning/smollm2_cpu.sh``'s output
``/tmp/ee_tuning_smollm2/smollm2_exits_tuned``); its tokenizer beside it. Without one the benchmark is
skipped with the command that makes it. ``--quick``: a tiny random Llama (two exits, NullTokenizer), the
mechanics only.

    python bench/bench_smollm2.py [--load DIR] [--prompts bench/prompts/general.jsonl] [--tokens 48]
        [--thresholds 0.9 0.7 0.5] [--measures top1] [--exit-layers 8 16] [--draft-exits 16 24] [--k 2 4]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_parser, fmt, machine_info, save_and_print, table  # noqa: E402
from megatron.checkpoint.model_loader import inference_args, load_inference_model  # noqa: E402
from megatron.text_generation.engine import InferenceEngine  # noqa: E402
from megatron.text_generation.generation import generate_tokens  # noqa: E402
from megatron.text_generation.request import EarlyExitParams, SamplingParams  # noqa: E402

RESULT = Path(__file__).resolve().parent / "results" / "smollm2.json"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TUNED = "/tmp/ee_tuning_smollm2/smollm2_exits_tuned"


def parse(argv):
    p = bench_parser(__doc__, "a tiny random Llama: the mechanics in seconds", "where the plot is written",
                     str(RESULT.parent))
    p.add_argument("--load", default=os.environ.get("EE_SMOLLM2_TUNED", DEFAULT_TUNED))
    p.add_argument("--tokenizer-model", default=None, help="Default: <load>/tokenizer (the converter's copy).")
    p.add_argument("--prompts", default=str(ROOT / "bench" / "prompts" / "general.jsonl"))
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    p.add_argument("--measures", nargs="+", default=["top1"])
    p.add_argument("--exit-layers", type=int, nargs="*", default=[], help="Exits that may fire (default all).")
    p.add_argument("--estimator-floors", type=float, nargs="*", default=[],
                   help="Also run each logit measure with these estimator floors (exits tuned with --exit-estimator).")
    p.add_argument("--draft-exits", type=int, nargs="*", default=None, help="Default: every exit.")
    p.add_argument("--k", type=int, nargs="+", default=[2, 4], help="Drafted tokens per speculative round.")
    p.add_argument("--no-hf", action="store_true", help="Skip the Hugging Face runner.")
    return p.parse_args(argv)


def _model(ns):
    """(LoadedModel, source description) or (None, reason to skip)."""
    if ns.quick:
        argv = ("--random-weights --num-layers 4 --hidden-size 64 --num-attention-heads 4 --group-query-attention "
                "--num-query-groups 2 --seq-length 128 --max-position-embeddings 128 --position-embedding-type rope "
                "--normalization RMSNorm --swiglu --disable-bias-linear --exit-layer-nums 1 3 --use-exit-norm "
                "--tokenizer-type NullTokenizer --vocab-size 512 --device cpu").split()
        return load_inference_model(inference_args(argv)), "random tiny Llama (4 layers, exits 1 and 3)"
    if not os.path.isfile(os.path.join(ns.load, "latest_checkpointed_iteration.txt")):
        return None, (f"no tuned SmolLM2 checkpoint at {ns.load}: run `bash examples/ee_tuning/smollm2_cpu.sh` "
                      "(or pass --load / set EE_SMOLLM2_TUNED)")
    tok = ns.tokenizer_model or os.path.join(ns.load, "tokenizer")
    if not os.path.isdir(tok):
        base = os.path.join(os.path.dirname(os.path.normpath(ns.load)), "smollm2_tp1_pp1", "tokenizer")
        tok = base if os.path.isdir(base) else tok
    argv = ["--load", ns.load, "--use-checkpoint-args", "--device", "cpu", "--tokenizer-type",
            "HuggingFaceTokenizer", "--tokenizer-model", tok]
    return load_inference_model(inference_args(argv)), ns.load


def _prompts(ns, model) -> list[list[int]]:
    if ns.quick:
        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, 500, (12,), generator=g).tolist() for _ in range(2)]
    from tools.sweep_thresholds import read_prompts

    return [model.tokenizer.tokenize(t) for t in read_prompts(ns.prompts)]


def _hf_model(load_dir: str):
    import transformers

    from megatron.model.hf_convert import hf_config_from, hf_from_full
    from tools.checkpoint.megatron_io import read_megatron

    ck = read_megatron(load_dir)
    hf = transformers.LlamaForCausalLM(hf_config_from(ck.model)).eval()
    hf.load_state_dict(hf_from_full(ck.full, ck.model, ck.ee).state_dict, strict=False)
    return hf


class Runner:
    def __init__(self, name: str, mode: str, run, ee: EarlyExitParams | None = None):
        self.name, self.mode, self.run, self.ee = name, mode, run, ee
        self.tokens: list[list[int]] = []
        self.exit_layers: list[list[int]] = []
        self.seconds: list[float] = []
        self.full_seconds: list[float] = []


def _ours(engine, ee: EarlyExitParams, tokens: int):
    sampling = SamplingParams(tokens_to_generate=tokens, greedy=True)

    def run(prompt):
        out = generate_tokens(engine, [prompt], sampling, ee)
        return out.tokens[0], out.exit_layers[0]

    return run


def _hf(hf, tokens: int, eos):
    def run(prompt):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                              eos_token_id=eos, pad_token_id=eos if eos is not None else 0)
        return out[0, len(prompt):].tolist(), []

    return run


def _fastest(fn, prompt, repeats: int):
    best, result = None, None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn(prompt)
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return result, best


@torch.no_grad()
def _judge(chunk, prompt: list[int], gen: list[int]) -> tuple[int, float]:
    """(generated tokens equal to the full model's choice on their prefix, summed NLL under the full model)."""
    if not gen:
        return 0, 0.0
    seq = torch.tensor([prompt + gen[:-1]])
    logits = chunk(input_ids=seq).output[0, len(prompt) - 1:, : chunk.config.vocab_size].float()
    target = torch.tensor(gen)
    agree = int((logits.argmax(-1) == target).sum())
    nll = float(-torch.log_softmax(logits, -1).gather(-1, target[:, None]).sum())
    return agree, nll


def _runners(ns, engine, model, hf) -> list[Runner]:
    ee_cfg = model.run.early_exit
    exits = list(ee_cfg.exit_layer_nums)
    runners = []
    if hf is not None:
        runners.append(Runner("Hugging Face generate", "hf", _hf(hf, ns.tokens, model.tokenizer.eod)))
    for measure in ns.measures:
        floors = [None] + ([f for f in ns.estimator_floors] if measure != "estimator" else [])
        for floor in floors:
            for thr in ns.thresholds:
                ee = EarlyExitParams(use_early_exit=True, early_exit_thres=thr, confidence=measure,
                                     exit_layers=list(ns.exit_layers), estimator_floor=floor)
                name = f"early exit {measure} >= {thr}" + ("" if floor is None else f", estimator >= {floor}")
                runners.append(Runner(name, "early_exit", _ours(engine, ee, ns.tokens), ee))
    for layer in (exits[:-1] if ns.draft_exits is None else ns.draft_exits):
        for k in ns.k:
            ee = EarlyExitParams(decoding="speculative", draft_exit_layer=layer, num_speculative_tokens=k)
            runners.append(Runner(f"self-speculative, draft exit {layer}, k {k}", "speculative",
                                  _ours(engine, ee, ns.tokens), ee))
    return runners


def main(argv=None) -> dict:
    ns = parse(argv)
    torch.set_num_threads(1)
    model, source = _model(ns)
    if model is None:
        return {"name": "smollm2", "title": "Early exit on SmolLM2-135M", "quick": ns.quick, "skipped": source,
                "tables": []}
    chunk = model.chunks[0]
    engine = InferenceEngine(model.chunks, model.state, model.tokenizer, model.run.model, model.run.early_exit)
    hf = None if (ns.quick or ns.no_hf) else _hf_model(ns.load)
    prompts = _prompts(ns, model)
    if ns.quick:
        ns.tokens, ns.repeats, ns.thresholds, ns.k = 8, 1, ns.thresholds[:2], ns.k[:1]
    full = Runner("our full depth", "full", _ours(engine, EarlyExitParams(), ns.tokens))
    runners = _runners(ns, engine, model, hf)
    for prompt in prompts:
        full.run(prompt)  # warm-up (first-call allocations)
        (tokens, layers), secs = _fastest(full.run, prompt, ns.repeats)
        full.tokens.append(tokens), full.exit_layers.append(layers), full.seconds.append(secs)
        for r in runners:
            (tokens, layers), secs = _fastest(r.run, prompt, ns.repeats)
            _, full_secs = _fastest(full.run, prompt, ns.repeats)
            r.tokens.append(tokens), r.exit_layers.append(layers), r.seconds.append(secs)
            r.full_seconds.append(full_secs)
    return _result(ns, source, model, chunk, prompts, full, runners)


def _row_stats(r: Runner, full: Runner, chunk, prompts) -> dict:
    n = sum(len(t) for t in r.tokens)
    agree, nll, same = 0, 0.0, 0
    for prompt, gen, ref in zip(prompts, r.tokens, full.tokens):
        a, s = _judge(chunk, prompt, gen)
        agree, nll = agree + a, nll + s
        same += sum(x == y for x, y in zip(gen, ref))
    tps = n / sum(r.seconds)
    base = sum(len(t) for t in full.tokens) / sum(r.full_seconds or full.seconds)
    layers = [x for row in r.exit_layers for x in row]
    return {"runner": r.name, "mode": r.mode, "tokens": n, "tokens_per_s": tps, "full_tokens_per_s": base,
            "ratio": tps / base, "fidelity": agree / max(n, 1), "nll": nll / max(n, 1),
            "same_as_full": same / max(sum(len(t) for t in full.tokens), 1),
            "mean_exit_layer": statistics.mean(layers) if layers else None,
            "ee_params": vars(r.ee) if r.ee is not None else None}


def _plot(rows: list[dict], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, marker in (("full", "s"), ("hf", "D"), ("early_exit", "o"), ("speculative", "^")):
        pts = [r for r in rows if r["mode"] == mode]
        if pts:
            ax.scatter([r["fidelity"] for r in pts], [r["ratio"] for r in pts], marker=marker, label=mode)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("fidelity (teacher-forced, vs the full model)")
    ax.set_ylabel("tokens/s over our full depth")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path.name


def _result(ns, source, model, chunk, prompts, full, runners) -> dict:
    rows = [_row_stats(full, full, chunk, prompts)] + [_row_stats(r, full, chunk, prompts) for r in runners]
    cells = [[r["runner"], fmt(r["tokens_per_s"]), f"{r['ratio']:.2f}x", f"{r['fidelity']:.3f}", f"{r['nll']:.3f}",
              f"{r['same_as_full']:.3f}", fmt(r["mean_exit_layer"]) if r["mean_exit_layer"] else "-"] for r in rows]
    picture = _plot(rows, Path(ns.out) / "smollm2.png") if not ns.quick else None
    return {
        "name": "smollm2", "title": "Early exit on SmolLM2-135M (batch 1, greedy, one thread)", "quick": ns.quick,
        "machine": machine_info(), "model": source, "prompts": len(prompts), "tokens": ns.tokens,
        "exits": list(model.run.early_exit.exit_layer_nums), "runs": rows, "picture": picture,
        "tables": [table("Decoding side by side with our full depth",
                         ["runner", "tokens/s", "vs full depth", "fidelity", "NLL", "same as full", "mean exit layer"],
                         cells, [f"{len(prompts)} prompts x {ns.tokens} tokens; {source}"])],
        "notes": ["each runner timed right after our full depth on the same prompt (fastest of --repeats each); "
                  "ratio = its tokens/s over full depth's in its own pairs",
                  "fidelity: generated tokens equal to the full model's argmax on the same prefix (teacher-forced); "
                  "NLL: the full model's mean negative log-likelihood of the generated tokens"],
    }


if __name__ == "__main__":
    save_and_print(main(sys.argv[1:]), RESULT)
