"""MMIDIDX .bin/.idx: a file built by hand from the specification reads back; ours parses field by field;
truncated or corrupt pairs are refused; merging equals writing everything at once."""

import os
import pickle
import struct

import numpy as np
import pytest

from megatron.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    best_fitting_dtype,
    write_dataset,
)
from tools import merge_datasets

SPEC_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7,
              np.uint16: 8}


def _hand_written(prefix, docs_of_seqs, dtype):
    """The layout of Megatron's ``MMapIndexedDataset`` (``megatron/data/indexed_dataset.py``) spelled out with
    struct, independent of our writer."""
    seqs = [np.asarray(s, dtype) for doc in docs_of_seqs for s in doc]
    sizes = [len(s) for s in seqs]
    pointers, pos = [], 0
    for n in sizes:
        pointers.append(pos)
        pos += n * np.dtype(dtype).itemsize
    doc_idx = [0]
    for doc in docs_of_seqs:
        doc_idx.append(doc_idx[-1] + len(doc))
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", SPEC_CODES[dtype]))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(struct.pack(f"<{len(sizes)}i", *sizes))
        f.write(struct.pack(f"<{len(pointers)}q", *pointers))
        f.write(struct.pack(f"<{len(doc_idx)}q", *doc_idx))
    with open(prefix + ".bin", "wb") as f:
        for s in seqs:
            f.write(s.astype(np.dtype(dtype).newbyteorder("<")).tobytes())
    return seqs, sizes, pointers, doc_idx


@pytest.mark.parametrize("dtype", list(SPEC_CODES))
def test_hand_built_file_reads_back(tmp_path, dtype):
    docs = [[[1, 2, 3], [4]], [[5, 6]], [[], [7, 8, 9, 10]]]
    seqs, sizes, pointers, doc_idx = _hand_written(str(tmp_path / "h"), docs, dtype)
    ds = IndexedDataset(str(tmp_path / "h"))
    assert ds.dtype == np.dtype(dtype) and len(ds) == len(seqs)
    assert ds.sizes.tolist() == sizes and ds.pointers.tolist() == pointers and ds.doc_idx.tolist() == doc_idx
    for i, s in enumerate(seqs):
        np.testing.assert_array_equal(ds[i], s)
    np.testing.assert_array_equal(ds.get(4, offset=1, length=2), np.asarray([8, 9], dtype))


def test_our_files_parse_field_by_field(tmp_path):
    prefix = str(tmp_path / "ours")
    b = IndexedDatasetBuilder(prefix, np.uint16)
    b.add_item([10, 20, 30])
    b.add_item([40])
    b.end_document()
    b.add_document([50, 60, 70, 65535], [1, 3])
    b.add_item([])
    b.finalize()
    raw = open(prefix + ".idx", "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack_from("<Q", raw, 9) == (1,)
    assert raw[17] == 8  # uint16
    s, d = struct.unpack_from("<QQ", raw, 18)
    assert (s, d) == (5, 4)
    off = 34
    assert list(struct.unpack_from("<5i", raw, off)) == [3, 1, 1, 3, 0]
    assert list(struct.unpack_from("<5q", raw, off + 20)) == [0, 6, 8, 10, 16]
    assert list(struct.unpack_from("<4q", raw, off + 60)) == [0, 2, 4, 5]  # open document closed by finalize
    assert len(raw) == off + 60 + 32
    data = open(prefix + ".bin", "rb").read()
    assert list(struct.unpack(f"<{len(data) // 2}H", data)) == [10, 20, 30, 40, 50, 60, 70, 65535]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def _corrupt(tmp_path, edit):
    prefix = str(tmp_path / "c")
    write_dataset(prefix, [[1, 2, 3], [4, 5], [6]], np.int32)
    edit(prefix)
    return prefix


def _patch(path, offset, payload):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(payload)


def _truncate(path, drop):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - drop)


@pytest.mark.parametrize("edit,message", [
    (lambda p: _truncate(p + ".bin", 4), "truncated"),
    (lambda p: _truncate(p + ".idx", 8), "truncated or corrupt"),
    (lambda p: _truncate(p + ".idx", os.path.getsize(p + ".idx") - 10), "header alone"),
    (lambda p: _patch(p + ".idx", 0, b"XXIDIDX"), "not an MMIDIDX index"),
    (lambda p: _patch(p + ".idx", 9, struct.pack("<Q", 2)), "version 2"),
    (lambda p: _patch(p + ".idx", 17, b"\x09"), "unknown dtype code 9"),
    (lambda p: _patch(p + ".idx", 34 + 12 + 8, struct.pack("<q", 4)), "byte offset of sequence 1"),
    (lambda p: _patch(p + ".idx", 34 + 36 + 8, struct.pack("<q", 3)), "decrease"),
    (lambda p: _patch(p + ".idx", 34 + 36 + 24, struct.pack("<q", 7)), "points past"),
    (lambda p: _patch(p + ".idx", 34, struct.pack("<i", -3)), "negative sequence length"),
    (lambda p: os.unlink(p + ".bin"), "not found"),
])
def test_corrupt_files_are_refused(tmp_path, edit, message):
    prefix = _corrupt(tmp_path, edit)
    with pytest.raises(IndexedDatasetError, match=message):
        IndexedDataset(prefix)


def test_ids_that_do_not_fit_are_refused(tmp_path):
    b = IndexedDatasetBuilder(str(tmp_path / "x"), np.uint16)
    with pytest.raises(IndexedDatasetError, match="do not fit .*uint16"):
        b.add_item([1, 70000])
    b.discard()
    assert os.listdir(tmp_path) == []


def test_best_fitting_dtype():
    assert best_fitting_dtype(50257) == np.uint16 and best_fitting_dtype(65499) == np.uint16
    assert best_fitting_dtype(65500) == np.int32 and best_fitting_dtype(128256) == np.int32


def test_merge_equals_single_write(tmp_path):
    rng = np.random.RandomState(0)
    docs = [rng.randint(0, 50000, size=rng.randint(1, 30)) for _ in range(30)]
    os.makedirs(tmp_path / "shards")
    for k in range(3):
        write_dataset(str(tmp_path / "shards" / f"part{k}"), docs[10 * k:10 * k + 10], np.uint16)
    write_dataset(str(tmp_path / "whole"), docs, np.uint16)
    merged = merge_datasets.main(["--input", str(tmp_path / "shards"), "--output-prefix", str(tmp_path / "m/merged")])
    assert [os.path.basename(p) for p in merged] == ["part0", "part1", "part2"]
    for ext in (".bin", ".idx"):
        assert open(tmp_path / f"m/merged{ext}", "rb").read() == open(tmp_path / f"whole{ext}", "rb").read()


def test_merge_refuses_mixed_dtypes(tmp_path):
    write_dataset(str(tmp_path / "a"), [[1, 2]], np.uint16)
    write_dataset(str(tmp_path / "b"), [[1, 2]], np.int32)
    with pytest.raises(IndexedDatasetError, match="share a dtype"):
        merge_datasets.merge([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out.idx")


def test_pickle_reopens_and_empty_dataset(tmp_path):
    write_dataset(str(tmp_path / "p"), [[3, 1, 4], [1, 5]], np.int32)
    ds = pickle.loads(pickle.dumps(IndexedDataset(str(tmp_path / "p"))))
    np.testing.assert_array_equal(ds[1], [1, 5])
    write_dataset(str(tmp_path / "e"), [], np.int32)
    empty = IndexedDataset(str(tmp_path / "e"))
    assert len(empty) == 0 and empty.doc_idx.tolist() == [0]
