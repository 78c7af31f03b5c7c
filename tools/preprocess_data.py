"""Tokenize a corpus into Megatron's indexed-dataset files: ``<prefix>_<key>_document.{bin,idx}``.

Input: JSON lines (``.jsonl``/``.json``, optionally ``.gz``), one document per line, the text under each
``--json-keys`` key (a list of strings counts as pre-split sentences); or plain text (``.txt``/``.txt.gz``)
where a document is a block of lines separated by blank lines. Flags follow Megatron's
``tools/preprocess_data.py``. Documents are encoded by a pool of ``--workers`` processes in chunks and
written in input order, so any number of workers writes the same bytes. Documents that tokenize to
nothing are skipped. With ``--split-sentences`` (needs nltk and its punkt data) each sentence is its own
sequence and the files are named ``..._sentence``.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt \\
        --append-eod --workers 4
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import multiprocessing
import os
import re
import sys
import time
from typing import Iterator

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.cli_errors import run_cli  # noqa: E402
from megatron.data.indexed_dataset import IndexedDatasetBuilder, best_fitting_dtype  # noqa: E402
from megatron.tokenizer import add_tokenizer_args, build_tokenizer_from_args  # noqa: E402

__all__ = ["main", "get_args", "read_documents", "sentence_splitter", "PreprocessError"]


class PreprocessError(ValueError):
    """Bad input or flags; the message names the line or flag and the fix."""


def sentence_splitter(lang: str, keep_newlines: bool):
    """nltk's punkt splitter for ``--split-sentences``; ``keep_newlines`` keeps the whitespace between
    sentences (newlines included) attached to the sentence before it."""
    try:
        import nltk
    except ImportError:
        raise PreprocessError("--split-sentences needs nltk: pip install nltk, then "
                              "python -m nltk.downloader punkt_tab (or drop --split-sentences)") from None
    try:
        punkt = nltk.tokenize.PunktTokenizer(lang) if hasattr(nltk.tokenize, "PunktTokenizer") \
            else nltk.data.load(f"tokenizers/punkt/{lang}.pickle")
    except LookupError:
        raise PreprocessError(f"--split-sentences: nltk's punkt data for --lang {lang} is missing; run "
                              "python -m nltk.downloader punkt_tab") from None
    if not keep_newlines:
        return punkt.tokenize

    def split(text: str) -> list[str]:
        starts = [s for s, _ in punkt.span_tokenize(text)]
        return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]

    return split


class Encoder:
    """Per-process tokenizer state; ``encode`` turns one raw document into token ids per key."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def initializer(self) -> None:
        self.tokenizer = build_tokenizer_from_args(self.args)
        self.split = sentence_splitter(self.args.lang, self.args.keep_newlines) if self.args.split_sentences else None

    def encode(self, item: tuple[int, str, bytes | str]):
        """(line number, kind, raw) -> ({key: (ids, sentence lengths)}, raw size in bytes)."""
        lineno, kind, raw = item
        texts = {self.args.json_keys[0]: raw} if kind == "txt" else self._fields(lineno, raw)
        out = {}
        for key, text in texts.items():
            sentences = text if isinstance(text, list) else (self.split(text) if self.split else [text])
            ids, lengths = [], []
            for sentence in sentences:
                try:
                    sentence_ids = self.tokenizer.tokenize(sentence)
                except ValueError as exc:
                    raise PreprocessError(f"{self.args.input}:{lineno}: key {key!r}: {exc}") from None
                if sentence_ids:
                    ids.extend(sentence_ids)
                    lengths.append(len(sentence_ids))
            if ids and self.args.append_eod:
                ids.append(self.tokenizer.eod)
                lengths[-1] += 1
            out[key] = (ids, lengths)
        return out, len(raw.encode("utf-8")) if isinstance(raw, str) else len(raw)

    def _fields(self, lineno: int, raw: str) -> dict[str, str | list[str]]:
        """The ``--json-keys`` texts of one JSON line, each a string or a list of strings."""
        where = f"{self.args.input}:{lineno}"
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise PreprocessError(f"{where}: not valid JSON ({exc})") from None
        except RecursionError:
            raise PreprocessError(f"{where}: JSON nested too deeply to read") from None
        if not isinstance(record, dict):
            raise PreprocessError(f"{where}: expected a JSON object with key(s) {self.args.json_keys}, "
                                  f"got {_json_type(record)}; write one object per line")
        missing = [k for k in self.args.json_keys if k not in record]
        if missing:
            raise PreprocessError(f"{where}: no key {missing[0]!r}; "
                                  f"set --json-keys to keys the records have ({sorted(record)})")
        for key in self.args.json_keys:
            value = record[key]
            if not (isinstance(value, str) or isinstance(value, list) and all(isinstance(v, str) for v in value)):
                got = f"a list holding {_json_type(next(v for v in value if not isinstance(v, str)))}" \
                    if isinstance(value, list) else _json_type(value)
                raise PreprocessError(f"{where}: key {key!r} holds {got}; it must be a string "
                                      "(or a list of strings: pre-split sentences)")
        return {k: record[k] for k in self.args.json_keys}


def _json_type(value) -> str:
    """JSON's name for the type of a decoded value, with its article ("an array", "null")."""
    if isinstance(value, bool):
        return "a boolean"
    names = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
             type(None): "null"}
    return names[type(value)]


def _open_text(path: str) -> io.TextIOBase:
    # Undecodable bytes become lone surrogates (U+DC80..U+DCFF, which valid UTF-8 never yields), so the
    # reader can name the line holding them instead of failing somewhere in a decoded chunk.
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="surrogateescape")
    return open(path, "r", encoding="utf-8", errors="surrogateescape")


_UNDECODABLE = re.compile("[\udc80-\udcff]")


def _checked_lines(path: str, f: io.TextIOBase) -> Iterator[tuple[int, str]]:
    """(line number, line) of ``f``; a line that is not UTF-8 is a :class:`PreprocessError` naming it."""
    for lineno, line in enumerate(f, 1):
        bad = _UNDECODABLE.search(line)
        if bad:
            byte = ord(bad.group()) - 0xDC00
            raise PreprocessError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{byte:02x} at character "
                                  f"{bad.start() + 1}); re-encode the file as UTF-8 (e.g. iconv -t UTF-8)")
        yield lineno, line


def read_documents(path: str) -> Iterator[tuple[int, str, str]]:
    """(line number, "json" or "txt", raw document) in file order."""
    plain = path.endswith((".txt", ".txt.gz"))
    with _open_text(path) as f:
        lines = _checked_lines(path, f)
        if not plain:
            for lineno, line in lines:
                if line.strip():
                    yield lineno, "json", line
            return
        block, first = [], 0
        for lineno, line in lines:
            if line.strip():
                if not block:
                    first = lineno
                block.append(line)
            elif block:
                yield first, "txt", "".join(block).rstrip("\n")
                block = []
        if block:
            yield first, "txt", "".join(block).rstrip("\n")


def _progress(count: int, nbytes: int, start: float, final: bool = False) -> None:
    elapsed = max(time.time() - start, 1e-9)
    word = "Done:" if final else "Processed"
    print(f"{word} {count} documents ({count / elapsed:.1f} docs/s, {nbytes / elapsed / 1024 / 1024:.2f} MB/s).",
          file=sys.stderr, flush=True)


_worker_encoder: Encoder | None = None  # one per pool process, set by _init_worker


def _init_worker(args: argparse.Namespace) -> None:
    global _worker_encoder
    _worker_encoder = Encoder(args)
    _worker_encoder.initializer()


def _encode_in_worker(item):
    return _worker_encoder.encode(item)


def _encoded(args: argparse.Namespace, docs: Iterator):
    if args.workers == 1:
        encoder = Encoder(args)
        encoder.initializer()
        yield from map(encoder.encode, docs)
        return
    with multiprocessing.Pool(args.workers, initializer=_init_worker, initargs=(args,)) as pool:
        # imap keeps input order, which makes the output independent of the worker count.
        yield from pool.imap(_encode_in_worker, docs, args.chunk_size)


def main(argv: list[str] | None = None) -> dict[str, str]:
    """Run the preprocessor; returns ``{key: output prefix}``."""
    args = get_args(argv)
    tokenizer = build_tokenizer_from_args(args)
    dtype = best_fitting_dtype(tokenizer.vocab_size)
    level = "sentence" if args.split_sentences else "document"
    prefixes = {key: f"{args.output_prefix}_{key}_{level}" for key in args.json_keys}
    if args.split_sentences:
        sentence_splitter(args.lang, args.keep_newlines)  # fail before any worker starts
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    builders = {key: IndexedDatasetBuilder(p, dtype) for key, p in prefixes.items()}
    start, count, nbytes = time.time(), 0, 0
    try:
        for doc, size in _encoded(args, read_documents(args.input)):
            count += 1
            nbytes += size
            for key, (ids, lengths) in doc.items():
                if ids:
                    builders[key].add_document(ids, lengths)
            if count % args.log_interval == 0:
                _progress(count, nbytes, start)
    except BaseException:
        for builder in builders.values():
            builder.discard()
        raise
    for builder in builders.values():
        builder.finalize()
    _progress(count, nbytes, start, final=True)
    return prefixes


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_argument_group(title="input data")
    group.add_argument("--input", type=str, required=True, help="JSON lines (.jsonl/.json[.gz]) or text (.txt[.gz]).")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="Keys to extract from each JSON record.")
    group.add_argument("--split-sentences", action="store_true", help="One sequence per sentence (needs nltk).")
    group.add_argument("--keep-newlines", action="store_true", help="Keep newlines between sentences when splitting.")
    group.add_argument("--lang", type=str, default="english", help="Language for nltk's sentence splitter.")
    add_tokenizer_args(parser)
    group = parser.add_argument_group(title="output data")
    group.add_argument("--append-eod", action="store_true", help="Append the tokenizer's eod to each document.")
    group.add_argument("--output-prefix", type=str, required=True, help="Writes <prefix>_<key>_document.{bin,idx}.")
    group = parser.add_argument_group(title="runtime")
    group.add_argument("--workers", type=int, default=1, help="Encoding processes.")
    group.add_argument("--chunk-size", type=int, default=32, help="Documents sent to a worker at a time.")
    group.add_argument("--log-interval", type=int, default=10000, help="Documents between progress lines.")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.input):
        parser.error(f"--input {args.input} is not a file")
    if args.workers < 1 or args.chunk_size < 1 or args.log_interval < 1:
        parser.error("--workers, --chunk-size and --log-interval must be positive")
    if args.input.endswith((".txt", ".txt.gz")) and len(args.json_keys) != 1:
        parser.error("plain-text --input has one field: give at most one --json-keys (it names the output)")
    if args.tokenizer_type is None:
        parser.error("--tokenizer-type is required")
    return args


if __name__ == "__main__":
    sys.exit(run_cli(main))
