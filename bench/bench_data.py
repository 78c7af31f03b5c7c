"""Data benchmark: ``tools/preprocess_data.py`` throughput on the bundled KJV corpus (1 and 2 workers)
against the same corpus tokenized by Hugging Face's ``tokenizers`` library directly (GPT-2 byte-level BPE
built from the same vocabulary and merges files).

Both sides read the same JSON lines and parse them; ours also writes the ``.bin/.idx`` files (with
``--append-eod``). The baseline only tokenizes, once with ``encode_batch`` (Rust threads) and once one
document at a time (one thread). The token ids are compared: ours (eod removed) must equal the library's.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import shutil
import tempfile
import time

import numpy as np

from bench.common import bench_parser, fmt, parse_positive, table
from megatron.tokenizer.bundled import GPT2_MERGE_FILE, GPT2_VOCAB_FILE, KJV_CORPUS, KJV_SAMPLE
from tools import preprocess_data

__all__ = ["main"]

MIB = 1024 * 1024
EOD = 50256  # GPT-2's <|endoftext|>


def _read_lines(path: str) -> list[str]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line for line in f if line.strip()]


def run_ours(corpus: str, workers: int, tmp: str) -> dict:
    """One preprocess_data run; returns seconds, documents and the written token ids."""
    prefix = os.path.join(tmp, f"ours_w{workers}")
    argv = ["--input", corpus, "--output-prefix", prefix, "--tokenizer-type", "GPT2BPETokenizer",
            "--vocab-file", str(GPT2_VOCAB_FILE), "--merge-file", str(GPT2_MERGE_FILE), "--append-eod",
            "--workers", str(workers), "--log-interval", str(10**9)]
    with contextlib.redirect_stderr(io.StringIO()):  # its progress line; we report our own numbers
        t0 = time.perf_counter()
        out = preprocess_data.main(argv)
        seconds = time.perf_counter() - t0
    ids = np.fromfile(out["text"] + ".bin", dtype=np.uint16)
    return {"seconds": seconds, "ids": ids}


def _hf_tokenizer(tmp: str):
    """GPT-2 byte-level BPE in ``tokenizers`` from the bundled (gzip-compressed) files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    paths = []
    for src, name in ((GPT2_VOCAB_FILE, "vocab.json"), (GPT2_MERGE_FILE, "merges.txt")):
        dst = os.path.join(tmp, name)
        with gzip.open(str(src) + ".gz", "rb") as fin, open(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        paths.append(dst)
    tok = Tokenizer(models.BPE.from_file(*paths))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def run_tokenizers(corpus: str, tok, batch: bool) -> dict:
    """Read + parse + tokenize with the library (``encode_batch`` or one ``encode`` per document)."""
    t0 = time.perf_counter()
    texts = [json.loads(line)["text"] for line in _read_lines(corpus)]
    if batch:
        encoded = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    else:
        encoded = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "ids": np.array([i for ids in encoded for i in ids + [EOD]], dtype=np.uint16)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = bench_parser(__doc__, "the 4-document sample instead of the full corpus",
                     "unused (outputs go to a temporary directory)")
    p.add_argument("--input", default=None, help="JSON lines corpus (default: the bundled KJV)")
    p.add_argument("--rounds", type=int, default=None, help="runs of each runner, best kept (default 3)")
    return parse_positive(p, argv, "rounds")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    corpus = args.input or str(KJV_SAMPLE if args.quick else KJV_CORPUS)
    if not os.path.exists(corpus):
        raise SystemExit(f"--input {corpus} does not exist")
    rounds = args.rounds or (1 if args.quick else 3)
    lines = _read_lines(corpus)
    docs, nbytes = len(lines), sum(len(line.encode("utf-8")) for line in lines)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        tok = _hf_tokenizer(tmp)
        runners = {f"preprocess_data, {w} worker{'s' * (w > 1)}": (lambda w=w: run_ours(corpus, w, tmp))
                   for w in (1, 2)}
        runners["tokenizers encode_batch (Rust threads)"] = lambda: run_tokenizers(corpus, tok, batch=True)
        runners["tokenizers encode, one document at a time"] = lambda: run_tokenizers(corpus, tok, batch=False)
        runs: dict[str, dict] = {}
        for _ in range(rounds):  # alternating, so load from other processes hits every runner alike
            for name, fn in runners.items():
                r = fn()
                runs.setdefault(name, {"ids": r["ids"], "times": []})["times"].append(r["seconds"])
    for r in runs.values():
        r["seconds"] = min(r["times"])
    reference = runs["tokenizers encode_batch (Rust threads)"]["ids"]
    base = runs["preprocess_data, 1 worker"]["seconds"]
    rows, raw = [], {}
    for name, r in runs.items():
        same = bool(np.array_equal(r["ids"], reference))
        rows.append([name, fmt(r["seconds"]), fmt(docs / r["seconds"]), fmt(nbytes / MIB / r["seconds"]),
                     fmt(len(r["ids"]) / r["seconds"]), f"{base / r['seconds']:.2f}x", "yes" if same else "NO"])
        raw[name] = {"seconds": r["seconds"], "all_seconds": r["times"], "docs_per_s": docs / r["seconds"],
                     "mib_per_s": nbytes / MIB / r["seconds"], "tokens": int(len(r["ids"])),
                     "ids_equal_reference": same}
    return {
        "name": "data",
        "title": "Data: preprocess_data against the tokenizers library",
        "quick": args.quick,
        "corpus": os.path.relpath(corpus, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        "documents": docs,
        "bytes": nbytes,
        "runs": raw,
        "tables": [table(
            f"GPT-2 BPE over {os.path.basename(corpus)} ({docs} documents, {nbytes / MIB:.2f} MiB of JSON lines)",
            ["runner", "seconds (best)", "docs/s", "MiB/s", "tokens/s", "speed vs 1 worker", "same token ids"], rows,
            ["tokens include one eod per document; 'same token ids' compares against encode_batch's ids"])],
        "notes": [f"wall time, best of {rounds} runs of each runner in alternating rounds, including reading and "
                  "JSON parsing; preprocess_data also loads its tokenizer, writes .bin/.idx and starts its worker "
                  "pool; MiB/s counts the JSON lines' bytes"],
    }
