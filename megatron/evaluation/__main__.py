"""Local task runner: evaluate a model on task files, no downloads.

    python -m megatron.evaluation --task mc.jsonl --task wiki.txt [--exit-layer 4 | --early-exit-thres 0.8] \
        [--output results.json] -- --load CKPT --use-checkpoint-args --tokenizer-type GPT2BPETokenizer ...

Flags before ``--`` are the runner's (``--help``); the rest are the usual Megatron / EE-LLM model flags
(``--random-weights`` with model-shape flags evaluates an untrained model, for trials). Launch tp x pp
processes with torchrun for a parallel model; global rank 0 prints and writes the results.
"""

from __future__ import annotations

import argparse
import json
import sys

from .adapter import HAVE_LM_EVAL, run_lm_eval
from megatron.cli_errors import run_cli

from .launch import add_eval_args, build_lm, build_model, split_argv
from .tasks import TASK_KINDS, load_task, run_task


def parse(argv=None) -> tuple[argparse.Namespace, list[str]]:
    argv, model_argv = split_argv(argv)
    parser = argparse.ArgumentParser(prog="python -m megatron.evaluation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", action="append", default=[], help="Task file (repeatable); see tasks.py.")
    parser.add_argument("--lm-eval-task", action="append", default=[],
                        help="An lm-eval task name (repeatable; needs the lm-eval package and the task's data).")
    parser.add_argument("--task-type", default="auto", choices=TASK_KINDS)
    parser.add_argument("--limit", type=int, default=None, help="Evaluate the first N items of each task only.")
    parser.add_argument("--output", default=None, help="Write the results as JSON here.")
    add_eval_args(parser)
    return parser.parse_args(argv), model_argv


def main(argv=None) -> int:
    ns, model_argv = parse(argv)
    if not ns.task and not ns.lm_eval_task:
        raise ValueError("give at least one --task FILE (or --lm-eval-task NAME)")
    if ns.lm_eval_task and not HAVE_LM_EVAL:
        run_lm_eval(None, ns.lm_eval_task)  # raises: says how to install it, before the model is built
    tasks = [load_task(path, ns.task_type) for path in ns.task]  # bad task files fail before the model is built
    model = build_model(model_argv)
    lm = build_lm(model, ns)
    results = []
    if ns.lm_eval_task:
        harness = run_lm_eval(lm, ns.lm_eval_task, limit=ns.limit)
        if harness is not None:  # None on ranks other than lm-eval's rank 0
            results.append({"lm_eval": harness.get("results", {})})
    for task in tasks:
        metrics = run_task(lm, task, max_gen_toks=ns.max_gen_toks, limit=ns.limit)
        metrics.update(exit_layer=ns.exit_layer, early_exit_thres=ns.early_exit_thres, confidence=ns.confidence)
        results.append(metrics)
    if model.state.rank == 0:
        for r in results:
            shown = {k: v for k, v in r.items() if k != "outputs"}
            print(json.dumps(shown, default=str))
        if ns.output:
            with open(ns.output, "w", encoding="utf-8") as f:
                json.dump({"results": results}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
