"""Local evaluation tasks read from files (no downloads), run over any object with lm-eval's ``LM`` methods.

Task kinds and their files:
- ``choice``: jsonl, one ``{"context": str, "choices": [str, ...], "gold": int}`` per line. Each choice is
  scored as the continuation of the context (put a leading space in the choices where the text needs
  one); metrics ``acc`` (highest log-likelihood) and ``acc_norm`` (log-likelihood per character).
- ``perplexity``: a text file (one document) or jsonl of ``{"text": str}`` (one document per line),
  scored with rolling windows; metrics ``perplexity`` (per token), ``logprob`` and ``tokens``.
- ``exact_match``: jsonl of ``{"context": str, "answer": str, "until": [str] (optional)}``; the greedy
  continuation (``max_gen_toks`` tokens at most, cut at ``until``) must equal the answer after stripping
  surrounding whitespace; metric ``exact_match``.
``kind="auto"`` picks ``perplexity`` for a non-jsonl file, else from the first record's keys.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from .adapter import Request

__all__ = ["Task", "TASK_KINDS", "load_task", "run_task"]

TASK_KINDS = ("auto", "choice", "perplexity", "exact_match")


@dataclass
class Task:
    name: str
    kind: str
    items: list[dict]


def _read_jsonl(path: str) -> list[dict]:
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--task {path}: line {n} is not JSON ({e.msg})") from e
            if not isinstance(item, dict):
                raise ValueError(f"--task {path}: line {n} must be a JSON object")
            items.append(item)
    if not items:
        raise ValueError(f"--task {path}: the file has no items")
    return items


def _detect(path: str, items: list[dict]) -> str:
    keys = set(items[0])
    if "choices" in keys:
        return "choice"
    if "answer" in keys:
        return "exact_match"
    if "text" in keys:
        return "perplexity"
    raise ValueError(f"--task {path}: cannot tell the task kind from the keys {sorted(keys)}: give --task-type, "
                     "or use {context, choices, gold} / {context, answer} / {text} records")


def _check(path: str, kind: str, items: list[dict]) -> None:
    required = {"choice": ("context", "choices", "gold"), "exact_match": ("context", "answer"),
                "perplexity": ("text",)}[kind]
    for n, item in enumerate(items, 1):
        missing = [k for k in required if k not in item]
        if missing:
            raise ValueError(f"--task {path}: item {n} lacks {missing} (a {kind} task needs {list(required)})")
        if kind == "choice":
            choices, gold = item["choices"], item["gold"]
            if not isinstance(choices, list) or len(choices) < 2:
                raise ValueError(f"--task {path}: item {n}: 'choices' must be a list of at least two strings")
            if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
                raise ValueError(f"--task {path}: item {n}: 'gold' must be an index into 'choices' "
                                 f"(0..{len(choices) - 1}), got {gold!r}")


def load_task(path: str, kind: str = "auto") -> Task:
    """Read and check a task file (see the module doc for the formats)."""
    if kind not in TASK_KINDS:
        raise ValueError(f"--task-type must be one of {', '.join(TASK_KINDS)}, got {kind!r}")
    if not os.path.isfile(path):
        raise ValueError(f"--task {path}: no such file")
    name = os.path.splitext(os.path.basename(path))[0]
    if not path.endswith(".jsonl"):
        if kind not in ("auto", "perplexity"):
            raise ValueError(f"--task {path}: a {kind} task is a .jsonl file; plain text files are perplexity tasks")
        with open(path, encoding="utf-8") as f:
            return Task(name, "perplexity", [{"text": f.read()}])
    items = _read_jsonl(path)
    kind = _detect(path, items) if kind == "auto" else kind
    _check(path, kind, items)
    return Task(name, kind, items)


def _choice(lm, items: list[dict]) -> dict:
    requests = [Request((it["context"], c)) for it in items for c in it["choices"]]
    scores = [lp for lp, _ in lm.loglikelihood(requests)]
    acc = acc_norm = 0
    pos = 0
    for it in items:
        lps = scores[pos: pos + len(it["choices"])]
        pos += len(it["choices"])
        norm = [lp / max(len(c), 1) for lp, c in zip(lps, it["choices"])]
        acc += int(max(range(len(lps)), key=lps.__getitem__) == it["gold"])
        acc_norm += int(max(range(len(norm)), key=norm.__getitem__) == it["gold"])
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items)}


def _perplexity(lm, items: list[dict]) -> dict:
    logprob = sum(lm.loglikelihood_rolling([Request((it["text"],)) for it in items]))
    tokens = sum(len(lm.tok_encode(it["text"])) for it in items)
    if tokens == 0:
        raise ValueError("perplexity: the documents have no tokens")
    return {"perplexity": math.exp(-logprob / tokens), "logprob": logprob, "tokens": tokens}


def _exact_match(lm, items: list[dict], max_gen_toks: int) -> dict:
    requests = [Request((it["context"], {"until": it.get("until", []), "max_gen_toks": max_gen_toks}))
                for it in items]
    outputs = lm.generate_until(requests)
    hits = sum(int(o.strip() == it["answer"].strip()) for o, it in zip(outputs, items))
    return {"exact_match": hits / len(items), "outputs": outputs}


def run_task(lm, task: Task, *, max_gen_toks: int = 32, limit: int | None = None) -> dict:
    """Metrics of ``task`` (the first ``limit`` items) under ``lm``, plus ``task``, ``kind``, ``items`` and,
    for our adapter, the mean exit layers of this task's tokens."""
    items = task.items[:limit] if limit else task.items
    if hasattr(lm, "reset_stats"):
        lm.reset_stats()
    if task.kind == "choice":
        metrics = _choice(lm, items)
    elif task.kind == "perplexity":
        metrics = _perplexity(lm, items)
    else:
        metrics = _exact_match(lm, items, max_gen_toks)
    stats = lm.stats() if hasattr(lm, "stats") else {}
    return {"task": task.name, "kind": task.kind, "items": len(items), **metrics, **stats}
