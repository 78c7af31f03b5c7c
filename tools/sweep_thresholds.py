"""Sweep early-exit thresholds: speed against quality, written as JSON and a PNG plot.

    python tools/sweep_thresholds.py --prompts tools/prompt_example.jsonl --thresholds 0.2:1.0:0.1 \
        --tokens 32 [--task mc.jsonl] --output-dir sweep/ -- --load CKPT --use-checkpoint-args ...

Flags before ``--`` are the sweep's; the rest are the usual Megatron / EE-LLM model flags, as for the
text-generation server (``--random-weights`` with model-shape flags for trials; torchrun with tp x pp
processes for a parallel model, global rank 0 writing the files). The prompts are decoded greedily at
full depth, then with early exits at each threshold, each right after a full-depth run of the same prompts;
each point records tokens/s (and the speed-up over that paired full-depth run), the average exit layer and each exit's share of the tokens, the agreement with the
full-depth output (share of positions holding the same token, a missing token counting as different)
and, with ``--task``, the task's metric under that threshold (see ``megatron/evaluation/tasks.py``).
Outputs: ``sweep.json`` and ``sweep.png`` in ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.cli_errors import run_cli  # noqa: E402
from megatron.evaluation.launch import add_eval_args, build_lm, build_model, split_argv  # noqa: E402
from megatron.evaluation.tasks import load_task, run_task  # noqa: E402
from megatron.text_generation.request import EarlyExitParams, GenerationRequest, SamplingParams  # noqa: E402

PRIMARY = {"choice": "acc", "exact_match": "exact_match", "perplexity": "perplexity"}


def parse_thresholds(spec: str) -> list[float]:
    """``start:stop:step`` (stop included) or a comma-separated list; every value in [0, 1]."""
    try:
        if ":" in spec:
            start, stop, step = (float(x) for x in spec.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            values = [round(start + i * step, 10) for i in range(int((stop - start) / step + 1e-9) + 1)]
        else:
            values = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--thresholds: give start:stop:step with step > 0 and stop >= start, or a comma "
                         f"list such as 0.9,0.8,0.5; got {spec!r}") from None
    bad = [v for v in values if not 0.0 <= v <= 1.0]
    if not values or bad:
        raise ValueError(f"--thresholds: values must lie in [0, 1], got {bad or 'none'}")
    return values


def read_prompts(path: str) -> list[str]:
    """A jsonl file of ``{"text": ...}`` (or ``"prompt"``) objects, or a text file with one prompt a line."""
    if not os.path.isfile(path):
        raise ValueError(f"--prompts {path}: no such file")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not path.endswith(".jsonl"):
                prompts.append(line.rstrip("\n"))
                continue
            item = json.loads(line)
            if not isinstance(item, dict) or not ({"text", "prompt"} & set(item)):
                raise ValueError(f"--prompts {path}: line {n} needs a 'text' (or 'prompt') field")
            prompts.append(item.get("text", item.get("prompt")))
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts")
    return prompts


def decode(generate_fn, prompts: list[str], ee: EarlyExitParams, tokens: int, batch: int, repeats: int = 1) -> dict:
    """Greedy generation of every prompt -> generated ids, exit layers and timing (each batch's fastest
    of ``repeats`` runs: greedy output repeats exactly, while other load on the machine only slows)."""
    out = {"tokens": [], "exit_layers": [], "elapsed_s": 0.0, "num_generated": 0}
    sampling = SamplingParams(tokens_to_generate=tokens, greedy=True)
    for lo in range(0, len(prompts), batch):
        runs = [generate_fn(GenerationRequest(prompts[lo: lo + batch], sampling, ee)) for _ in range(repeats)]
        result = runs[0]
        out["tokens"] += result.tokens
        out["exit_layers"] += result.exit_layers
        out["elapsed_s"] += min(r.elapsed_s for r in runs)
        out["num_generated"] += result.num_generated
    return out


def agreement(reference: list[list[int]], tokens: list[list[int]]) -> float:
    """Share of positions (over the longer of each pair) where both outputs hold the same token."""
    same = total = 0
    for ref, got in zip(reference, tokens):
        total += max(len(ref), len(got))
        same += sum(int(a == b) for a, b in zip(ref, got))
    return same / total if total else 1.0


def point(run: dict, num_layers: int, reference: dict | None) -> dict:
    layers = [layer for seq in run["exit_layers"] for layer in seq]
    share = {str(layer): layers.count(layer) / len(layers) for layer in sorted(set(layers))} if layers else {}
    speed = run["num_generated"] / run["elapsed_s"] if run["elapsed_s"] > 0 else 0.0
    return {"tokens_per_s": speed, "num_generated": run["num_generated"], "elapsed_s": run["elapsed_s"],
            "mean_exit_layer": sum(layers) / len(layers) if layers else float(num_layers), "exit_share": share,
            "agreement": 1.0 if reference is None else agreement(reference["tokens"], run["tokens"])}


def sweep(generate_fn, prompts: list[str], thresholds: list[float], *, tokens: int, batch: int, num_layers: int,
          confidence: str = "top1", repeats: int = 1, task_eval=None, estimator_floor: float | None = None,
          exit_layers: list[int] | None = None) -> dict:
    """Full depth, then every threshold, each timed right after a full-depth run of the same prompts (pairs:
    load on the machine slows both alike): a point's ``speedup`` is its tokens/s over its own pair's full
    depth. The ``full_depth`` point is the fastest of those full-depth runs. ``task_eval(threshold or None) ->
    metrics`` adds task results."""
    decode(generate_fn, prompts[:1], EarlyExitParams(), 1, 1)  # warm-up: first-call costs out of the timings
    full = decode(generate_fn, prompts, EarlyExitParams(), tokens, batch, repeats)
    result = {"full_depth": point(full, num_layers, None), "points": []}
    if task_eval is not None:
        result["full_depth"]["task"] = task_eval(None)
    for thres in thresholds:
        ee = EarlyExitParams(use_early_exit=True, early_exit_thres=thres, confidence=confidence,
                             estimator_floor=estimator_floor, exit_layers=list(exit_layers or []))
        pair = point(decode(generate_fn, prompts, EarlyExitParams(), tokens, batch, repeats), num_layers, None)
        p = {"threshold": thres, **point(decode(generate_fn, prompts, ee, tokens, batch, repeats), num_layers, full)}
        p["full_depth_tokens_per_s"] = pair["tokens_per_s"]
        p["speedup"] = p["tokens_per_s"] / pair["tokens_per_s"] if pair["tokens_per_s"] > 0 else 0.0
        if pair["tokens_per_s"] > result["full_depth"]["tokens_per_s"]:
            result["full_depth"].update(tokens_per_s=pair["tokens_per_s"], elapsed_s=pair["elapsed_s"])
        if task_eval is not None:
            p["task"] = task_eval(thres)
        result["points"].append(p)
    return result


def plot(result: dict, path: str) -> None:
    """Quality against speed: agreement (and the task metric, when present) over tokens/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts, full = result["points"], result["full_depth"]
    panels = [("agreement", "agreement with full depth", lambda p: p["agreement"])]
    if "task" in full:
        metric = PRIMARY[full["task"]["kind"]]
        panels.append((metric, f"task {full['task']['task']}: {metric}", lambda p: p["task"][metric]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (_, title, value) in zip(axes[0], panels):
        xs, ys = [p["tokens_per_s"] for p in pts], [value(p) for p in pts]
        ax.plot(xs, ys, "o-", label="early exit")
        for p, x, y in zip(pts, xs, ys):
            ax.annotate(f"{p['threshold']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.plot([full["tokens_per_s"]], [value(full)], "s", color="black", label="full depth")
        ax.set_xlabel("tokens / s")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"threshold sweep ({result['config']['confidence']} confidence)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse(argv=None) -> tuple[argparse.Namespace, list[str]]:
    argv, model_argv = split_argv(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", required=True, help="Prompt file (.jsonl with 'text', or one per line).")
    parser.add_argument("--thresholds", default="0.1:1.0:0.1", help="start:stop:step or a comma list.")
    parser.add_argument("--tokens", type=int, default=32, help="Tokens generated per prompt.")
    parser.add_argument("--repeats", type=int, default=1, help="Time each generation this often, keep the fastest.")
    parser.add_argument("--task", default=None, help="Also evaluate this task file at every threshold.")
    parser.add_argument("--output-dir", default="sweep", help="Where sweep.json and sweep.png go.")
    parser.add_argument("--estimator-floor", type=float, default=None,
                        help="Measure an exit only where its learned estimate reaches this (exits tuned with "
                             "--exit-estimator).")
    parser.add_argument("--exit-layers", type=int, nargs="*", default=[],
                        help="Only these exits may fire (default: all; tools/measure_exits.py recommends a set).")
    add_eval_args(parser)
    return parser.parse_args(argv), model_argv


def _task_evaluator(model, ns: argparse.Namespace, task, generate_fn):
    """``threshold or None -> metrics``: one adapter per threshold, all sharing one generation engine."""
    def evaluate(thres):
        lm = build_lm(model, ns, early_exit_thres=thres, generate_fn=generate_fn)
        return run_task(lm, task, max_gen_toks=ns.max_gen_toks)
    return evaluate


def main(argv=None) -> int:
    ns, model_argv = parse(argv)
    thresholds, prompts = parse_thresholds(ns.thresholds), read_prompts(ns.prompts)
    if ns.tokens < 1 or ns.repeats < 1:
        raise ValueError(f"--tokens and --repeats must be >= 1, got {ns.tokens} and {ns.repeats}")
    if ns.exit_layer is not None or ns.early_exit_thres is not None:
        raise ValueError("--exit-layer / --early-exit-thres do not apply: the sweep sets the threshold itself")
    task = load_task(ns.task) if ns.task else None
    model = build_model(model_argv)
    lm = build_lm(model, ns)
    task_eval = None if task is None else _task_evaluator(model, ns, task, lm.generate)
    result = sweep(lm.generate, prompts, thresholds, tokens=ns.tokens, batch=ns.eval_batch_size,
                   num_layers=model.num_layers, confidence=ns.confidence, repeats=ns.repeats,
                   task_eval=task_eval, estimator_floor=ns.estimator_floor, exit_layers=ns.exit_layers)
    result["config"] = {"prompts": ns.prompts, "num_prompts": len(prompts), "tokens": ns.tokens,
                        "repeats": ns.repeats, "confidence": ns.confidence, "estimator_floor": ns.estimator_floor,
                        "allowed_exits": ns.exit_layers, "task": ns.task, "num_layers": model.num_layers,
                        "exit_layers": model.exit_layers, "tp": model.state.tp, "pp": model.state.pp}
    if model.state.rank == 0:
        os.makedirs(ns.output_dir, exist_ok=True)
        with open(os.path.join(ns.output_dir, "sweep.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        plot(result, os.path.join(ns.output_dir, "sweep.png"))
        for p in result["points"]:
            print(f"thres {p['threshold']:.3g}: {p['tokens_per_s']:.1f} tok/s (x{p['speedup']:.2f}), "
                  f"mean exit {p['mean_exit_layer']:.2f}, agreement {p['agreement']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
