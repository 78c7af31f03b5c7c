"""Token ids against the vocabulary, checked once at start-up: a dataset with ids the vocabulary lacks is
refused naming the file and the flag (split, blended and per-split paths, negative ids, the training entry
point), and the scanned range is cached per file version."""

import os

import numpy as np
import pytest

from megatron.data import token_range
from megatron.data.gpt_dataset import build_train_valid_test_datasets
from megatron.data.indexed_dataset import IndexedDataset, write_dataset
from megatron.data.token_range import Vocabulary, VocabularyError, check_token_ids
from pretrain_early_exit_gpt import main


def _write(prefix, high, dtype=np.uint16, low=0, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(low, high, rng.integers(10, 40)) for _ in range(30)]
    docs[7][3] = high - 1  # the largest id is there for sure
    write_dataset(str(prefix), docs, dtype)
    return str(prefix)


def _build(data_path=None, vocabulary=None, **paths):
    return build_train_valid_test_datasets(data_path, "80,20,0", [20, 5, 0], 8, 1234, vocabulary=vocabulary,
                                           **paths)


def test_ids_outside_the_vocabulary_name_the_file_and_the_flag(tmp_path):
    good, bad = _write(tmp_path / "good", 40), _write(tmp_path / "bad", 64)
    train, valid, _ = _build(good, Vocabulary(41, "--vocab-size 40"))
    assert len(train) >= 20 and len(valid) >= 5
    want = rf"{bad}\.bin holds token ids in \[0, 63\], but --vocab-size 40 gives ids 0\.\.40 only: .*tools/preprocess"
    with pytest.raises(VocabularyError, match=want):
        _build(bad, Vocabulary(41, "--vocab-size 40"))
    with pytest.raises(VocabularyError, match=rf"{bad}\.bin holds"):  # a blend names the bad one of its files
        _build(["0.5", good, "0.5", bad], Vocabulary(41, "--vocab-size 40"))
    with pytest.raises(VocabularyError, match=rf"{bad}\.bin holds"):
        _build(train_data_prefix=[good], valid_data_prefix=[bad], vocabulary=Vocabulary(41, "--vocab-size 40"))
    assert _build(bad, Vocabulary(64, "--vocab-size 63"))[0] is not None


def test_negative_ids_are_refused(tmp_path):
    prefix = _write(tmp_path / "neg", 10, np.int32, low=-2)
    with pytest.raises(VocabularyError, match=r"neg\.bin holds token ids in \[-2, 9\]"):
        check_token_ids(IndexedDataset(prefix), Vocabulary(100, "--vocab-size 99"), [str(tmp_path / "cache")])


def test_the_range_is_scanned_once_per_version_of_the_file(tmp_path, monkeypatch):
    prefix = _write(tmp_path / "d", 50)
    cache = [str(tmp_path / "index-cache")]
    scans = []
    real = token_range._scan
    monkeypatch.setattr(token_range, "_scan", lambda tokens: scans.append(len(tokens)) or real(tokens))
    assert token_range.token_id_range(IndexedDataset(prefix), cache) == (0, 49)
    assert token_range.token_id_range(IndexedDataset(prefix), cache) == (0, 49)
    assert len(scans) == 1 and len(os.listdir(cache[0])) == 2  # Megatron's cache layout: .dsc + one .npy
    _write(tmp_path / "d", 70, seed=1)  # rewritten in place: another size and time
    assert token_range.token_id_range(IndexedDataset(prefix), cache) == (0, 69)
    assert len(scans) == 2
    write_dataset(str(tmp_path / "empty"), [], np.uint16)
    check_token_ids(IndexedDataset(str(tmp_path / "empty")), Vocabulary(1, "--vocab-size 0"), cache)


def test_training_refuses_before_the_first_step(tmp_path):
    """Ids 41..47 fit the padded embedding (48 rows) but not --vocab-size 40: refused, not trained on."""
    prefix = _write(tmp_path / "tok", 48)
    argv = ["--data-path", prefix, "--split", "90,10,0", "--tokenizer-type", "NullTokenizer",
            "--make-vocab-size-divisible-by", "16", "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "4", "--seq-length", "8", "--micro-batch-size", "2", "--global-batch-size", "2",
            "--lr", "1e-3", "--train-iters", "2", "--eval-iters", "0", "--num-workers", "0",
            "--save", str(tmp_path / "ckpt"), "--save-interval", "1"]
    with pytest.raises(VocabularyError, match=rf"{prefix}\.bin holds token ids in \[0, 47\], but --vocab-size 40 "):
        main(argv + ["--vocab-size", "40"])
    assert not os.path.exists(tmp_path / "ckpt")
    assert main(argv + ["--vocab-size", "47"]).iteration == 2
