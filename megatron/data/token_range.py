"""The token ids a dataset holds, checked against the vocabulary once, before training starts.

A ``.bin`` written with another tokenizer (or a ``--vocab-size`` smaller than its ids) otherwise fails only
when a bad batch reaches the embedding, mid-run, with an index error naming neither the file nor the flag.
The range of ids of each ``.bin`` is found by one scan and cached like the sample indices (Megatron's
index-cache layout, keyed by the file's path, size and modification time), so the ``.idx`` format stays
Megatron's byte for byte and later starts cost nothing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from megatron.data.index_cache import cached_arrays
from megatron.data.indexed_dataset import IndexedDataset, data_file_path

__all__ = ["Vocabulary", "VocabularyError", "data_vocabulary", "token_id_range", "check_token_ids"]

log = logging.getLogger(__name__)

_SCAN_CHUNK = 1 << 26  # tokens per step of the scan: bounded memory on any size of file


class VocabularyError(ValueError):
    """A dataset holds token ids outside the vocabulary; the message names the file and the flags."""


@dataclass(frozen=True)
class Vocabulary:
    """Valid token ids are ``0 .. size - 1``; ``flags`` says which command-line flags set ``size``."""

    size: int
    flags: str


def data_vocabulary(tokenizer, tokenizer_type: str) -> Vocabulary:
    """The ids of ``tokenizer`` (the embedding has at least as many rows: the flags are validated so)."""
    if tokenizer_type == "NullTokenizer":
        flag = tokenizer.vocab_size - 1  # --vocab-size N: ids 0..N-1 and the end-of-document id N
        return Vocabulary(tokenizer.vocab_size, f"--vocab-size {flag} (NullTokenizer: ids 0..{flag - 1} "
                                                f"and the end-of-document id {flag})")
    return Vocabulary(tokenizer.vocab_size, f"--tokenizer-type {tokenizer_type} (with its vocabulary file / model)")


def _scan(tokens: np.ndarray) -> np.ndarray:
    lo, hi = None, None
    for start in range(0, len(tokens), _SCAN_CHUNK):
        part = tokens[start:start + _SCAN_CHUNK]
        lo = int(part.min()) if lo is None else min(lo, int(part.min()))
        hi = int(part.max()) if hi is None else max(hi, int(part.max()))
    return np.array([lo, hi] if lo is not None else [], dtype=np.int64)


def token_id_range(indexed: IndexedDataset, cache_dirs: list[str], group=None) -> tuple[int, int] | None:
    """(smallest, largest) token id of ``indexed`` (None when it holds no tokens); collective over
    ``group`` like :func:`~megatron.data.index_cache.cached_arrays`, whose cache it uses."""
    path = os.path.realpath(data_file_path(indexed.path_prefix))
    stat = os.stat(path)
    desc = f"Token id range\n\nData file {path}\nBytes {stat.st_size}\nModified (ns) {stat.st_mtime_ns}\n"

    def build():
        log.info("scanning the token ids of %s (once: the range is cached)", path)
        return {"token_range": _scan(indexed.tokens)}

    arrays, _ = cached_arrays(desc, ["token_range"], build, cache_dirs, group=group)
    found = arrays["token_range"]
    return (int(found[0]), int(found[1])) if len(found) else None


def check_token_ids(indexed: IndexedDataset, vocabulary: Vocabulary, cache_dirs: list[str], group=None) -> None:
    """Refuse a dataset whose ids do not all lie in ``0 .. vocabulary.size - 1``, naming the file and flags."""
    found = token_id_range(indexed, cache_dirs, group)
    if found is None or (found[0] >= 0 and found[1] < vocabulary.size):
        return
    raise VocabularyError(
        f"{data_file_path(indexed.path_prefix)} holds token ids in [{found[0]}, {found[1]}], but {vocabulary.flags} "
        f"gives ids 0..{vocabulary.size - 1} only: the data was tokenized with another vocabulary; pass the "
        "tokenizer flags it was written with, or re-run tools/preprocess_data.py with this tokenizer"
    )
