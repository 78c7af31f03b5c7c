"""Megatron's memory-mapped indexed dataset (``MMIDIDX`` ``.bin``/``.idx`` pair): reader and writer.

Byte layout (little-endian), identical to Megatron-LM's ``MMapIndexedDataset``:

``.idx``: 9-byte magic ``MMIDIDX\\x00\\x00`` | u64 version (1) | u8 dtype code | u64 sequence count S |
u64 document-index length D (documents + 1) | int32[S] sequence lengths | int64[S] byte offsets into
``.bin`` (running sum of length * itemsize from 0) | int64[D] document indices (``[0, n1, n1+n2, ...]``) |
optionally int8[S] modes (multimodal datasets; read, never written here).

``.bin``: the token arrays of all sequences concatenated, in the dtype of the code.

The reader checks every field against the file lengths before use, so a truncated or corrupt pair is
refused with :class:`IndexedDatasetError` instead of being silently misread. The writer stages both
files under temporary names and renames them on :meth:`IndexedDatasetBuilder.finalize`, so a crash
never leaves a pair that looks complete.
"""

from __future__ import annotations

import os
import shutil
import struct
from array import array
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "DTYPE_CODES",
    "HEADER_MAGIC",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "IndexedDatasetError",
    "best_fitting_dtype",
    "data_file_path",
    "index_file_path",
    "write_dataset",
]

HEADER_MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document-index length
_CHECK_CHUNK = 1 << 22  # offsets are verified in chunks so a huge index never needs a full-size temporary


class IndexedDatasetError(ValueError):
    """An ``.idx``/``.bin`` pair is missing, truncated or inconsistent, or a write request is invalid."""


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def best_fitting_dtype(vocab_size: int | None) -> type:
    """Megatron's choice for token files: uint16 below 65500 ids, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def dtype_code(dtype) -> int:
    dt = np.dtype(dtype)
    if dt not in _CODE_OF:
        names = ", ".join(np.dtype(t).name for t in DTYPE_CODES.values())
        raise IndexedDatasetError(f"dtype {dt.name} cannot be stored in an MMIDIDX file; use one of {names}")
    return _CODE_OF[dt]


class IndexedDataset:
    """Read-only, memory-mapped view of ``<prefix>.idx`` + ``<prefix>.bin``.

    ``ds[i]`` is sequence ``i`` as a numpy array; ``ds.get(i, offset, length)`` a slice of it without
    copying. ``sizes`` (int32), ``pointers`` (int64 byte offsets) and ``document_indices`` (int64) are the
    index arrays; ``doc_idx`` is Megatron's name for the last."""

    def __init__(self, path_prefix: str) -> None:
        self.path_prefix = str(path_prefix)
        self._open()

    def _open(self) -> None:
        idx_path, bin_path = index_file_path(self.path_prefix), data_file_path(self.path_prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise IndexedDatasetError(
                    f"{path} not found: an indexed dataset needs both <prefix>.idx and <prefix>.bin "
                    "(write them with tools/preprocess_data.py; pass the prefix without the extension)"
                )
        idx_len = os.path.getsize(idx_path)
        if idx_len < _HEADER.size:
            raise IndexedDatasetError(f"{idx_path} is truncated: {idx_len} bytes, the header alone is {_HEADER.size}")
        with open(idx_path, "rb") as f:
            magic, version, code, seq_count, doc_count = _HEADER.unpack(f.read(_HEADER.size))
        if magic != HEADER_MAGIC:
            raise IndexedDatasetError(
                f"{idx_path} is not an MMIDIDX index (magic {magic!r}, expected {HEADER_MAGIC!r}); "
                "only Megatron's mmap format is supported, re-run tools/preprocess_data.py"
            )
        if version != VERSION:
            raise IndexedDatasetError(f"{idx_path} has index version {version}; only version {VERSION} is known")
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{idx_path} has unknown dtype code {code} (valid: {sorted(DTYPE_CODES)})")
        self._dtype = np.dtype(DTYPE_CODES[code])
        expected = _HEADER.size + seq_count * 12 + doc_count * 8
        if idx_len not in (expected, expected + seq_count):
            raise IndexedDatasetError(
                f"{idx_path} has {idx_len} bytes but its header ({seq_count} sequences, {doc_count} document "
                f"indices) needs {expected}: the file is truncated or corrupt"
            )
        buf = np.memmap(idx_path, mode="r", dtype=np.uint8)
        off = _HEADER.size
        self._sizes = np.frombuffer(buf, np.int32, seq_count, off)
        self._pointers = np.frombuffer(buf, np.int64, seq_count, off + seq_count * 4)
        self._doc_idx = np.frombuffer(buf, np.int64, doc_count, off + seq_count * 12)
        self._modes = None
        if idx_len == expected + seq_count:
            self._modes = np.frombuffer(buf, np.int8, seq_count, expected)
        self._check(idx_path, bin_path)
        bin_len = os.path.getsize(bin_path)
        # np.memmap refuses an empty file; an empty dataset simply has no tokens.
        self._bin = np.memmap(bin_path, mode="r", dtype=np.uint8) if bin_len else np.zeros(0, np.uint8)

    def _check(self, idx_path: str, bin_path: str) -> None:
        sizes, pointers, doc_idx = self._sizes, self._pointers, self._doc_idx
        n = len(sizes)
        if n and int(sizes.min()) < 0:
            raise IndexedDatasetError(f"{idx_path}: negative sequence length at {int(np.argmin(sizes))} (corrupt)")
        if len(doc_idx) == 0 or doc_idx[0] != 0:
            raise IndexedDatasetError(f"{idx_path}: document indices must start with 0 (corrupt)")
        steps = np.diff(doc_idx)
        if len(steps) and int(steps.min()) < 0:
            raise IndexedDatasetError(f"{idx_path}: document indices decrease at {int(np.argmin(steps)) + 1} (corrupt)")
        if int(doc_idx[-1]) > n:
            raise IndexedDatasetError(
                f"{idx_path}: document index {int(doc_idx[-1])} points past the {n} sequences (corrupt)"
            )
        item = self._dtype.itemsize
        running = 0
        for start in range(0, n, _CHECK_CHUNK):
            lens = sizes[start:start + _CHECK_CHUNK].astype(np.int64) * item
            want = running + np.concatenate(([0], np.cumsum(lens[:-1])))
            bad = np.flatnonzero(pointers[start:start + _CHECK_CHUNK] != want)
            if len(bad):
                i = start + int(bad[0])
                raise IndexedDatasetError(
                    f"{idx_path}: byte offset of sequence {i} is {int(pointers[i])}, the lengths before it "
                    f"give {int(want[bad[0]])} (corrupt index)"
                )
            running = int(want[-1] + lens[-1])
        bin_len = os.path.getsize(bin_path)
        if bin_len != running:
            raise IndexedDatasetError(
                f"{bin_path} has {bin_len} bytes but {idx_path} describes {running} "
                f"({n} sequences of {self._dtype.name}): the pair is truncated or does not belong together"
            )

    def __getstate__(self):
        # Reopen from disk after pickling (DataLoader workers under spawn) instead of copying the maps.
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state) -> None:
        self.path_prefix = state["path_prefix"]
        self._open()

    def __len__(self) -> int:
        return len(self._sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``i`` (to its end when ``length`` is None)."""
        n = len(self._sizes)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for a dataset of {n} sequences")
        size = int(self._sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {i} of length {size}")
        start = int(self._pointers[i]) + offset * self._dtype.itemsize
        return np.frombuffer(self._bin, self._dtype, length, start)

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def tokens(self) -> np.ndarray:
        """Every token of the ``.bin``, all sequences concatenated (memory-mapped, not copied)."""
        return np.frombuffer(self._bin, self._dtype)

    @property
    def sizes(self) -> np.ndarray:
        return self._sizes

    @property
    def pointers(self) -> np.ndarray:
        return self._pointers

    @property
    def document_indices(self) -> np.ndarray:
        return self._doc_idx

    doc_idx = document_indices

    @property
    def modes(self) -> np.ndarray | None:
        return self._modes

    @staticmethod
    def exists(path_prefix: str) -> bool:
        return os.path.isfile(index_file_path(path_prefix)) and os.path.isfile(data_file_path(path_prefix))


class IndexedDatasetBuilder:
    """Writes ``<prefix>.bin``/``<prefix>.idx`` incrementally.

    ``add_item(tokens)`` appends one sequence, ``end_document()`` closes a document (a run of sequences),
    ``add_document(tokens, lengths)`` does both for a document of several sequences, ``add_index(prefix)``
    appends a whole existing dataset of the same dtype, ``finalize()`` writes the index and publishes both
    files. A document still open at ``finalize`` or ``add_index`` is closed first."""

    def __init__(self, path_prefix: str, dtype=np.int32) -> None:
        self.path_prefix = str(path_prefix)
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)
        self._info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        self._tmp_bin = data_file_path(self.path_prefix) + ".tmp"
        self._data = open(self._tmp_bin, "wb")
        self._sizes = array("q")
        self._doc_idx = array("q", [0])

    def _checked(self, tokens) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise IndexedDatasetError(f"a sequence must be 1-D, got shape {arr.shape}")
        if self._info is not None and arr.size and arr.dtype != self.dtype:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < self._info.min or hi > self._info.max:
                raise IndexedDatasetError(
                    f"token ids in [{lo}, {hi}] do not fit the dataset dtype {self.dtype.name}; "
                    "write with a wider dtype (int32) for vocabularies of 65500 ids or more"
                )
        return arr.astype(self.dtype, copy=False)

    def add_item(self, tokens) -> None:
        arr = self._checked(tokens)
        self._data.write(arr.tobytes(order="C"))
        self._sizes.append(arr.size)

    def end_document(self) -> None:
        self._doc_idx.append(len(self._sizes))

    def add_document(self, tokens, lengths: Sequence[int]) -> None:
        arr = self._checked(tokens)
        if sum(lengths) != arr.size or any(n < 0 for n in lengths):
            raise IndexedDatasetError(f"sequence lengths {list(lengths)} do not add up to the {arr.size} tokens given")
        self._data.write(arr.tobytes(order="C"))
        self._sizes.extend(int(n) for n in lengths)
        self.end_document()

    def _close_open_document(self) -> None:
        if self._doc_idx[-1] != len(self._sizes):
            self.end_document()

    def add_index(self, path_prefix: str) -> None:
        other = IndexedDataset(path_prefix)
        if other.dtype != self.dtype:
            raise IndexedDatasetError(
                f"cannot merge {path_prefix} ({other.dtype.name}) into {self.path_prefix} ({self.dtype.name}): "
                "datasets must share a dtype (re-run preprocess_data with the same tokenizer)"
            )
        self._close_open_document()
        base = len(self._sizes)
        self._sizes.extend(other.sizes.astype(np.int64).tolist())
        self._doc_idx.extend((other.document_indices[1:] + base).tolist())
        with open(data_file_path(path_prefix), "rb") as f:
            shutil.copyfileobj(f, self._data)

    def discard(self) -> None:
        """Abandon the write: close and delete the staged data; nothing is published."""
        self._data.close()
        if os.path.exists(self._tmp_bin):
            os.unlink(self._tmp_bin)

    def finalize(self) -> None:
        self._close_open_document()
        self._data.close()
        sizes = np.frombuffer(self._sizes, np.int64) if len(self._sizes) else np.zeros(0, np.int64)
        if len(sizes) and int(sizes.max()) > np.iinfo(np.int32).max:
            raise IndexedDatasetError("a sequence longer than 2**31-1 tokens cannot be indexed (int32 lengths)")
        pointers = np.zeros(len(sizes), np.int64)
        if len(sizes) > 1:
            np.cumsum(sizes[:-1] * self.dtype.itemsize, out=pointers[1:])
        tmp_idx = index_file_path(self.path_prefix) + ".tmp"
        with open(tmp_idx, "wb") as f:
            f.write(_HEADER.pack(HEADER_MAGIC, VERSION, dtype_code(self.dtype), len(sizes), len(self._doc_idx)))
            f.write(sizes.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(np.frombuffer(self._doc_idx, np.int64).astype("<i8").tobytes())
        os.replace(self._tmp_bin, data_file_path(self.path_prefix))
        os.replace(tmp_idx, index_file_path(self.path_prefix))


def write_dataset(path_prefix: str, documents: Iterable[Sequence[int]], dtype=np.int32) -> None:
    """Write one sequence per document (the GPT layout); a convenience for tools and tests."""
    builder = IndexedDatasetBuilder(path_prefix, dtype)
    for doc in documents:
        builder.add_item(doc)
        builder.end_document()
    builder.finalize()
