"""Tuning data with no dataset: the model's own continuations of a prompt file, written as an indexed dataset.

    python tools/generate_tuning_data.py --prompts data/prompts/tuning.jsonl --tokens 128 \
        --output-prefix runs/self --temperature 0.7 --top-p 0.95 -- --load CKPT --use-checkpoint-args ...

Exits tuned to agree with the model's final head learn best from text the model itself produces: its own
hidden states, on the kind of text it will decode (EE-Tuning on a fixed corpus learns that corpus instead).
Each prompt is continued ``--samples-per-prompt`` times by sampling at full depth (``--temperature``,
``--top-p``; ``--seed`` makes the data reproducible); every document written is the prompt's tokens followed
by its continuation (and the tokenizer's end-of-document token with ``--append-eod``), so a tuning run sees
each continuation in its context. Output: ``<prefix>_text_document.{bin,idx}``, what
``tools/preprocess_data.py`` writes and ``--data-path`` reads. ``--max-minutes`` bounds the time: the
prompts done by then are written. Flags after ``--`` are the usual model flags (as for the server; torchrun
with tp x pp processes for a parallel model, global rank 0 writing the files).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from megatron.cli_errors import run_cli  # noqa: E402
from megatron.data.indexed_dataset import IndexedDatasetBuilder, best_fitting_dtype  # noqa: E402
from megatron.evaluation.launch import build_model, split_argv  # noqa: E402
from megatron.text_generation.engine import InferenceEngine  # noqa: E402
from megatron.text_generation.generation import generate_tokens  # noqa: E402
from megatron.text_generation.request import EarlyExitParams, SamplingParams  # noqa: E402
from tools.sweep_thresholds import read_prompts  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", required=True, help="A .jsonl file of {\"text\": ...} objects, or one prompt a line.")
    p.add_argument("--output-prefix", required=True, help="Writes <prefix>_text_document.{bin,idx}.")
    p.add_argument("--tokens", type=int, default=128, help="Tokens generated per continuation (at most).")
    p.add_argument("--samples-per-prompt", type=int, default=1, help="Continuations of each prompt.")
    p.add_argument("--temperature", type=float, default=0.7, help="Sampling temperature (> 0).")
    p.add_argument("--top-p", type=float, default=0.95, help="Nucleus sampling (0 = off).")
    p.add_argument("--seed", type=int, default=1234, help="Seed of the sampling (the data is reproducible).")
    p.add_argument("--batch-size", type=int, default=32, help="Prompts decoded together.")
    p.add_argument("--append-eod", action="store_true", help="End every document with the end-of-document token.")
    p.add_argument("--max-minutes", type=float, default=None, help="Stop after this long, writing what is done.")
    ns = p.parse_args(argv)
    for flag, value, ok in (("--tokens", ns.tokens, ns.tokens >= 1), ("--batch-size", ns.batch_size, ns.batch_size >= 1),
                            ("--samples-per-prompt", ns.samples_per_prompt, ns.samples_per_prompt >= 1),
                            ("--temperature", ns.temperature, ns.temperature > 0),
                            ("--top-p", ns.top_p, 0 <= ns.top_p <= 1)):
        if not ok:
            raise ValueError(f"{flag}: {value} is out of range (see --help)")
    return ns


def generate_documents(engine, tokenizer, prompts: list[str], ns, log=print) -> list[list[int]]:
    """Every (prompt, sample) as prompt ids + continuation ids, in prompt order; stops early at
    ``ns.max_minutes`` (whole batches only)."""
    start = time.monotonic()
    jobs = [tokenizer.tokenize(p) for p in prompts for _ in range(ns.samples_per_prompt)]
    if any(not ids for ids in jobs):
        raise ValueError(f"--prompts: prompt {next(i for i, ids in enumerate(jobs) if not ids) // ns.samples_per_prompt + 1} "
                         "has no tokens")
    docs, generated = [], 0
    for lo in range(0, len(jobs), ns.batch_size):
        if ns.max_minutes is not None and time.monotonic() - start > 60 * ns.max_minutes:
            log(f"--max-minutes {ns.max_minutes} reached after {len(docs)} of {len(jobs)} continuations")
            break
        batch = jobs[lo: lo + ns.batch_size]
        # one seed per batch: a batch's draws do not depend on how many batches ran before it
        sampling = SamplingParams(tokens_to_generate=ns.tokens, temperature=ns.temperature, top_p=ns.top_p,
                                  random_seed=ns.seed + lo)
        out = generate_tokens(engine, batch, sampling, EarlyExitParams())
        for ids, gen in zip(batch, out.tokens):
            docs.append(list(ids) + list(gen))
            generated += len(gen)
        rate = generated / max(time.monotonic() - start, 1e-9)
        log(f"{len(docs)}/{len(jobs)} continuations, {generated} tokens generated ({rate:.1f} tokens/s)")
    return docs


def write_documents(prefix: str, docs: list[list[int]], vocab_size: int, eod: int | None) -> str:
    out = f"{prefix}_text_document"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    builder = IndexedDatasetBuilder(out, dtype=best_fitting_dtype(vocab_size))
    try:
        for doc in docs:
            builder.add_item(np.asarray(doc + ([eod] if eod is not None else []), dtype=np.int64))
            builder.end_document()
        builder.finalize()
    except BaseException:
        builder.discard()
        raise
    return out


def main(argv=None) -> int:
    own, model_argv = split_argv(argv)
    ns = parse(own)
    prompts = read_prompts(ns.prompts)
    model = build_model(model_argv)
    engine = InferenceEngine(model.chunks, model.state, model.tokenizer, model.run.model, model.run.early_exit)
    first = model.state.rank == 0
    docs = generate_documents(engine, model.tokenizer, prompts, ns, log=print if first else (lambda *_: None))
    if not docs:
        raise ValueError(f"--max-minutes {ns.max_minutes}: no continuation was generated in that time; allow more")
    if first:
        eod = model.tokenizer.eod if ns.append_eod else None
        out = write_documents(ns.output_prefix, docs, model.tokenizer.vocab_size, eod)
        print(f"wrote {out}.bin/.idx: {len(docs)} documents, {sum(map(len, docs))} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
