"""GPT pre-training samples over indexed datasets, with Megatron's split, index and blending rules.

A sample is ``seq_length + 1`` consecutive tokens of the shuffled document stream, and consecutive
samples share one boundary token (the last input token's label is the next sample's first token).
The three index arrays follow Megatron-LM exactly, so the same data and seed give the same samples:

* ``doc_idx``: the split's documents repeated once per epoch and shuffled with
  ``np.random.RandomState(seed)`` (int32). If the last epoch supplies fewer than 80% of an epoch's
  samples, it is shuffled separately and appended, so that partial epoch is not spread over the others.
* ``sample_idx``: int32 ``[n + 1, 2]`` (position in ``doc_idx``, offset) where each sample starts.
* ``shuffle_idx``: ``arange(n)`` shuffled (uint32, int64 when huge); with a separate last epoch, its
  samples are shuffled among themselves after the others.

The arrays are cached as ``.npy`` files named by the md5 of a description (see :mod:`index_cache`).
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import torch

from megatron.data.blendable_dataset import BlendableDataset, parse_blend
from megatron.data.helpers import build_sample_idx
from megatron.data.index_cache import cached_arrays
from megatron.data.indexed_dataset import IndexedDataset
from megatron.data.token_range import Vocabulary, check_token_ids

__all__ = [
    "GPTDataset",
    "build_train_valid_test_datasets",
    "build_index_arrays",
    "get_train_valid_test_split",
    "num_epochs_for",
    "LAST_EPOCH_FRACTION",
]

LAST_EPOCH_FRACTION = 0.80
_INDEX_NAMES = ["doc_idx", "sample_idx", "shuffle_idx"]


class DatasetConfigError(ValueError):
    """Bad ``--data-path`` / ``--split`` / sample-count input; the message names the flag."""


def get_train_valid_test_split(splits_string: str, size: int) -> list[int]:
    """Document boundaries ``[0, a, b, size]`` for a ``--split`` like "990,9,1" or "98/2/0"."""
    sep = "," if "," in splits_string else "/"
    try:
        splits = [float(s) for s in splits_string.split(sep)]
    except ValueError:
        raise DatasetConfigError(f"--split {splits_string!r} must be numbers separated by ',' or '/'") from None
    splits = (splits + [0.0, 0.0])[:3]
    total = sum(splits)
    if total <= 0 or min(splits) < 0:
        raise DatasetConfigError(f"--split {splits_string!r} needs non-negative parts with a positive sum")
    bounds = [0]
    for s in splits:
        bounds.append(bounds[-1] + int(round(s / total * float(size))))
    drift = bounds[-1] - size
    return [bounds[0]] + [b - drift for b in bounds[1:]]


def num_epochs_for(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Smallest e with ``(e * tokens_per_epoch - 1) // seq_length >= num_samples``."""
    if tokens_per_epoch <= 0:
        raise DatasetConfigError("the dataset split has no tokens; check --split and the data files")
    epochs = max(1, math.ceil((num_samples * seq_length + 1) / tokens_per_epoch))
    while epochs > 1 and ((epochs - 1) * tokens_per_epoch - 1) // seq_length >= num_samples:
        epochs -= 1
    while (epochs * tokens_per_epoch - 1) // seq_length < num_samples:
        epochs += 1
    return epochs


def _doc_idx(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate_last: bool):
    if separate_last and num_epochs > 1:
        first = _doc_idx(documents, num_epochs - 1, rng, False)
        last = _doc_idx(documents, 1, rng, False)
        return np.concatenate((first, last))
    doc_idx = np.tile(np.asarray(documents, np.int32), num_epochs)
    rng.shuffle(doc_idx)
    return doc_idx


def _shuffle_idx(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    dtype = np.int64 if total_size >= np.iinfo(np.uint32).max - 1 else np.uint32
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def build_index_arrays(documents, sizes, num_samples: int, seq_length: int, seed: int,
                       impl: str = "auto") -> dict[str, np.ndarray]:
    """``doc_idx``, ``sample_idx`` and ``shuffle_idx`` for ``num_samples`` samples (pure, uncached)."""
    documents = np.asarray(documents)
    tokens_per_epoch = int(np.sum(sizes[documents], dtype=np.int64))
    num_epochs = num_epochs_for(tokens_per_epoch, seq_length, num_samples)
    rng = np.random.RandomState(seed=seed)
    separate_last = False
    if num_epochs > 1:
        from_full_epochs = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        last_epoch_samples = num_samples - from_full_epochs
        per_epoch = (tokens_per_epoch - 1) // seq_length
        separate_last = last_epoch_samples < int(LAST_EPOCH_FRACTION * per_epoch)
    doc_idx = _doc_idx(documents, num_epochs, rng, separate_last)
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch, impl=impl)
    total = sample_idx.shape[0] - 1
    shuffle_idx = _shuffle_idx(from_full_epochs if separate_last else total, total, rng)
    return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx}


def _cache_dirs(data_prefix: str, data_cache_path: str | None) -> list[str]:
    """Where a dataset's cached arrays are looked up, in order (the last one receives new builds)."""
    directories = [os.path.join(os.path.dirname(data_prefix), "index-cache")]
    if data_cache_path is not None:
        directories.append(data_cache_path)
    return directories


def _open(prefix: str, vocabulary: Vocabulary | None, data_cache_path, group) -> IndexedDataset:
    """The indexed dataset at ``prefix``, its token ids checked against ``vocabulary`` (when given)."""
    indexed = IndexedDataset(prefix)
    if vocabulary is not None:
        check_token_ids(indexed, vocabulary, _cache_dirs(prefix, data_cache_path), group)
    return indexed


class GPTDataset(torch.utils.data.Dataset):
    """Samples ``{'text': int64[seq_length + 1]}`` of one split of one indexed dataset."""

    def __init__(self, name: str, data_prefix: str, documents: np.ndarray, indexed_dataset: IndexedDataset,
                 splits_string: str, num_samples: int, seq_length: int, seed: int, *,
                 data_cache_path: str | None = None, group=None) -> None:
        self.name = name
        self.indexed_dataset = indexed_dataset
        sizes = indexed_dataset.sizes
        documents = np.asarray(documents, np.int32)
        if len(documents) == 0 or documents.min() < 0 or documents.max() >= len(sizes):
            raise DatasetConfigError(f"{name} split of {data_prefix}: document ids outside [0, {len(sizes)})")
        if seq_length <= 0 or num_samples < 0:
            raise DatasetConfigError(
                f"--seq-length ({seq_length}) must be > 0 and the sample count ({num_samples}) >= 0")
        self.desc = (
            "GPT Dataset\n\n"
            f"Data prefix {data_prefix}\n"
            f"Dataset name {name}\n"
            f"Number of samples {num_samples}\n"
            f"Sequence length {seq_length}\n"
            f"Random seed {seed}\n"
            f"Split {splits_string}\n"
        )
        arrays, self.index_built_here = cached_arrays(
            self.desc, _INDEX_NAMES,
            lambda: build_index_arrays(documents, sizes, num_samples, seq_length, seed),
            _cache_dirs(data_prefix, data_cache_path), group=group,
        )
        self.doc_idx, self.sample_idx, self.shuffle_idx = (arrays[n] for n in _INDEX_NAMES)

    def __len__(self) -> int:
        return self.sample_idx.shape[0] - 1

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {self.name} dataset of {len(self)} samples")
        j = int(self.shuffle_idx[idx])
        doc_f, off_f = (int(v) for v in self.sample_idx[j])
        doc_l, off_l = (int(v) for v in self.sample_idx[j + 1])
        get = self.indexed_dataset.get
        if doc_f == doc_l:
            sample = get(int(self.doc_idx[doc_f]), offset=off_f, length=off_l - off_f + 1)
        else:
            parts = [get(int(self.doc_idx[doc_f]), offset=off_f)]
            parts += [get(int(self.doc_idx[k])) for k in range(doc_f + 1, doc_l)]
            parts.append(get(int(self.doc_idx[doc_l]), length=off_l + 1))
            sample = np.concatenate(parts)
        return {"text": np.asarray(sample, dtype=np.int64)}


def _split_datasets(prefix: str, splits_string: str, num_samples: Sequence[int], seq_length: int, seed: int,
                    data_cache_path, group, vocabulary) -> list:
    indexed = _open(prefix, vocabulary, data_cache_path, group)
    bounds = get_train_valid_test_split(splits_string, len(indexed.sizes))
    out = []
    for i, name in enumerate(("train", "valid", "test")):
        if bounds[i + 1] > bounds[i]:
            docs = np.arange(bounds[i], bounds[i + 1], dtype=np.int32)
            out.append(GPTDataset(name, prefix, docs, indexed, splits_string, num_samples[i], seq_length, seed,
                                  data_cache_path=data_cache_path, group=group))
        else:
            out.append(None)
    return out


def _whole_dataset(name: str, prefixes: Sequence[str], splits_string: str, num_samples: int, seq_length: int,
                   seed: int, data_cache_path, group, vocabulary):
    """One dataset (or a blend) from ``--{train,valid,test}-data-path``: every document, no split."""
    def build(prefix, n):
        indexed = _open(prefix, vocabulary, data_cache_path, group)
        docs = np.arange(len(indexed.sizes), dtype=np.int32)
        return GPTDataset(name, prefix, docs, indexed, splits_string, n, seq_length, seed,
                          data_cache_path=data_cache_path, group=group)

    if len(prefixes) == 1:
        return build(prefixes[0], num_samples)
    names, weights, counts = parse_blend(prefixes, [num_samples])
    datasets = [build(p, c[0]) for p, c in zip(names, counts)]
    return BlendableDataset(datasets, weights, sum(c[0] for c in counts), data_cache_path=data_cache_path,
                            group=group)


def build_train_valid_test_datasets(data_prefix, splits_string: str, train_valid_test_num_samples: Sequence[int],
                                    seq_length: int, seed: int, data_cache_path: str | None = None, *,
                                    train_data_prefix=None, valid_data_prefix=None, test_data_prefix=None,
                                    group=None, vocabulary: Vocabulary | None = None):
    """(train, valid, test) datasets, each None when it gets no documents or no path.

    ``data_prefix`` is ``--data-path``: one prefix or ``[w1, p1, w2, p2, ...]`` (blended; each dataset is
    asked for ``ceil(n * w * 1.005)`` samples). Without it the separate ``*_data_prefix`` lists are used
    whole and ``splits_string`` only enters the cache description. ``group``: the ranks that build
    datasets together (those call this function); its first rank builds the index cache. ``vocabulary``:
    every data file's token ids must lie in it (checked once, before any sample is read)."""
    if isinstance(data_prefix, str):
        data_prefix = [data_prefix]
    if len(train_valid_test_num_samples) != 3:
        raise DatasetConfigError("train_valid_test_num_samples must hold three counts (train, valid, test)")
    if data_prefix:
        if len(data_prefix) == 1:
            return tuple(_split_datasets(data_prefix[0], splits_string, train_valid_test_num_samples, seq_length,
                                         seed, data_cache_path, group, vocabulary))
        prefixes, weights, counts = parse_blend(data_prefix, train_valid_test_num_samples)
        per_prefix = [_split_datasets(p, splits_string, c, seq_length, seed, data_cache_path, group, vocabulary)
                      for p, c in zip(prefixes, counts)]
        blends = []
        for i in range(3):
            parts = [(ds[i], w) for ds, w in zip(per_prefix, weights) if ds[i] is not None]
            size = sum(c[i] for c in counts)
            blends.append(BlendableDataset([d for d, _ in parts], [w for _, w in parts], size,
                                           data_cache_path=data_cache_path, group=group) if parts else None)
        return tuple(blends)
    if not (train_data_prefix or valid_data_prefix or test_data_prefix):
        raise DatasetConfigError("no data: pass --data-path, or --train-data-path/--valid-data-path/--test-data-path, "
                                 "or --mock-data")
    out = []
    for name, prefixes, n in zip(("train", "valid", "test"), (train_data_prefix, valid_data_prefix, test_data_prefix),
                                 train_valid_test_num_samples):
        if isinstance(prefixes, str):
            prefixes = [prefixes]
        out.append(_whole_dataset(name, prefixes, splits_string, n, seq_length, seed, data_cache_path, group,
                                  vocabulary) if prefixes else None)
    return tuple(out)
