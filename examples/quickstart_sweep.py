"""The quick start's decoding table (step 5 of ``examples/quickstart.sh``): greedy generation from a few
prompts at full depth, then with early exits at each threshold, through ``tools/sweep_thresholds.py``'s
``sweep``; prints threshold -> tokens/s, average exit layer, share of tokens equal to the full-depth output
and each exit's share, then every setting's continuation of the first prompt; writes ``sweep.json`` (the
sweep tool's, plus the continuations) to ``--output-dir``.

    torchrun --nproc_per_node 2 examples/quickstart_sweep.py --prompts prompts.txt --thresholds 1.0,0.5,0.0 \
        --tokens 32 --output-dir out -- --load CKPT --use-checkpoint-args --tokenizer-type ... --device cpu

The flags are ``tools/sweep_thresholds.py``'s (less ``--task``); those after ``--`` build the model as the
text-generation server does (one process per tp x pp rank, so a checkpoint that this runs on also opens
in the server). Global rank 0 prints and writes.
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron.evaluation.adapter import make_generate_fn  # noqa: E402
from megatron.cli_errors import run_cli  # noqa: E402
from megatron.evaluation.launch import build_model  # noqa: E402
from tools.sweep_thresholds import parse, parse_thresholds, read_prompts, sweep  # noqa: E402

FULL = "full"


def recording(generate_fn, first_prompt: str, tokens: int, examples: dict):
    """``generate_fn`` that also keeps, per setting (threshold or full depth), the continuation of
    ``first_prompt`` from the first full-length request starting with it."""
    def generate(request):
        result = generate_fn(request)
        ee = request.early_exit
        if request.prompts[0] == first_prompt and request.sampling.tokens_to_generate == tokens:
            examples.setdefault(ee.early_exit_thres if ee.use_early_exit else FULL, result.texts[0])
        return result
    return generate


def _row(name: str, p: dict, exits: list[int], num_layers: int) -> str:
    share = "/".join(f"{100 * p['exit_share'].get(str(layer), 0.0):.0f}" for layer in exits)
    note = "  (slower than full depth)" if p.get("speedup", 1.0) < 1.0 else ""
    if "threshold" in p and p["mean_exit_layer"] >= num_layers:
        note = "  (no token left early)"
    return (f"{name:>9}  {p['tokens_per_s']:9.1f}  {p.get('speedup', 1.0):7.2f}x  {p['mean_exit_layer']:8.2f}"
            f"  {100 * p['agreement']:11.1f}%  {share:>14}{note}")


MARGIN = 1.05  # a paired speed-up below this is within the run-to-run noise of a shared machine


def verdict(result: dict, num_layers: int, min_equal: float = 0.9) -> str:
    """Whether early exit pays on this model in this run: the fastest threshold at which tokens did leave
    early while ``min_equal`` of them stayed equal to full depth's, and whether it beats full depth by more
    than the noise (:data:`MARGIN`)."""
    kept = [p for p in result["points"] if p["agreement"] >= min_equal and p["mean_exit_layer"] < num_layers]
    best = max(kept, key=lambda p: p["speedup"], default=None)
    pct = f"{100 * min_equal:.0f}%"
    if best is not None and best["speedup"] >= MARGIN:
        return (f"early exit pays here: threshold {best['threshold']:.2f} decodes {best['speedup']:.2f}x as fast as "
                f"full depth with {100 * best['agreement']:.1f}% of the tokens equal to full depth's")
    fastest = "" if best is None else (f" (the fastest that keeps {pct}, threshold {best['threshold']:.2f}, runs at "
                                       f"{best['speedup']:.2f}x)")
    return (f"early exit does not pay on this model in this run: no threshold where tokens leave early is faster "
            f"than full depth by {MARGIN:.2f}x or more with {pct} of the tokens equal{fastest}. On a model this small an exit's vocabulary projection costs about as "
            f"much as the layers it saves and per-step overheads dominate. README.md's section 'Early exit on a "
            f"real LLM' measures it on SmolLM2-135M with exits tuned to agree with the model "
            f"(examples/ee_tuning/smollm2_cpu.sh)")


def table(result: dict, examples: dict, prompt: str, num_layers: int, exit_layers: list[int]) -> str:
    exits = sorted(set(exit_layers) | {num_layers})
    lines = [f"{'threshold':>9}  {'tokens/s':>9}  {'speed-up':>8}  {'avg exit':>8}  {'= full depth':>12}  "
             f"{'% at ' + '/'.join(map(str, exits)):>14}",
             _row(FULL, result["full_depth"], exits, num_layers)]
    lines += [_row(f"{p['threshold']:.2f}", p, exits, num_layers) for p in result["points"]]
    lines.append("\n" + verdict(result, num_layers))
    lines.append(f"\ncontinuations of {prompt!r}:")
    for key in [FULL] + [p["threshold"] for p in result["points"]]:
        text = " / ".join(examples.get(key, "").split("\n")).strip()
        lines.append(f"{key if key == FULL else format(key, '.2f'):>9}  {text[:110]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ns, model_argv = parse(argv)
    thresholds, prompts = parse_thresholds(ns.thresholds), read_prompts(ns.prompts)
    if ns.tokens < 1 or ns.repeats < 1:
        raise ValueError(f"--tokens and --repeats must be >= 1, got {ns.tokens} and {ns.repeats}")
    if ns.task or ns.exit_layer is not None or ns.early_exit_thres is not None:
        raise ValueError("--task, --exit-layer and --early-exit-thres do not apply here: use tools/sweep_thresholds.py")
    model = build_model(model_argv)
    examples: dict = {}
    generate_fn = recording(make_generate_fn(model.chunks, model.state, model.tokenizer, model.run.model,
                                             model.run.early_exit), prompts[0], ns.tokens, examples)
    result = sweep(generate_fn, prompts, thresholds, tokens=ns.tokens, batch=ns.eval_batch_size,
                   num_layers=model.num_layers, confidence=ns.confidence, repeats=ns.repeats)
    if model.state.rank != 0:
        return 0
    result["config"] = {"num_layers": model.num_layers, "exit_layers": model.exit_layers, "tokens": ns.tokens,
                        "repeats": ns.repeats, "confidence": ns.confidence, "prompts": prompts,
                        "pp": model.state.pp, "tp": model.state.tp}
    result["continuations"] = {str(k): v for k, v in examples.items()}
    print(table(result, examples, prompts[0], model.num_layers, model.exit_layers), flush=True)
    os.makedirs(ns.output_dir, exist_ok=True)
    with open(os.path.join(ns.output_dir, "sweep.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
