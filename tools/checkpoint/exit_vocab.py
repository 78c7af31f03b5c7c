"""The reduced vocabulary of the exits (``--conversion-type exit-vocab``): the ``K`` most frequent token ids
of indexed datasets, written into a checkpoint's ``exit_vocab`` buffer.

Frequencies are counted over every token of every ``.bin`` given (memory-mapped, one ``bincount`` each);
the ``K`` ids with the highest counts are kept, ties broken by the smaller id, and stored sorted ascending
(int64 ``[K]``, state-dict key ``exit_vocab`` on every chunk owning an exit; ``--exit-vocab-size K`` in the
saved args). Inference projects exits onto these rows only (see ``megatron/model/early_exit_gpt_model.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from megatron.config import ConfigError
from megatron.data.indexed_dataset import IndexedDataset
from megatron.model.state_dict_sharding import EXIT_VOCAB_KEY, check_full_state_dict

from .megatron_io import ModelCheckpoint

__all__ = ["token_counts", "most_frequent", "set_exit_vocab"]


def token_counts(prefixes: Sequence[str], vocab_size: int) -> np.ndarray:
    """Occurrences of each id ``0 .. vocab_size - 1`` over the datasets ``prefixes`` (``--data-path``)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for prefix in prefixes:
        tokens = IndexedDataset(prefix).tokens
        if tokens.size and int(tokens.max()) >= vocab_size:
            raise ConfigError(f"--data-path {prefix} holds token id {int(tokens.max())}, outside the checkpoint's "
                              f"vocabulary of {vocab_size}: it was tokenized for another model")
        counts += np.bincount(tokens, minlength=vocab_size)[:vocab_size]
    return counts


def most_frequent(counts: np.ndarray, k: int) -> torch.Tensor:
    """The ``k`` ids with the highest counts (ties: the smaller id), sorted ascending, int64."""
    if not 1 <= k <= counts.size:
        raise ConfigError(f"--exit-vocab-size must lie in 1..{counts.size} (the checkpoint's vocabulary), got {k}")
    order = np.lexsort((np.arange(counts.size), -counts))  # by count descending, then id ascending
    return torch.from_numpy(np.sort(order[:k])).to(torch.int64)


def set_exit_vocab(ckpt: ModelCheckpoint, ids: torch.Tensor) -> ModelCheckpoint:
    """``ckpt`` with its exits' vocabulary set to ``ids`` (``--exit-vocab-size`` becomes ``len(ids)``)."""
    if not ckpt.ee.exit_layer_nums:
        raise ConfigError("the checkpoint has no exits to give a vocabulary; add them first with --conversion-type "
                          "add-exit")
    ee = dataclasses.replace(ckpt.ee, exit_vocab_size=int(ids.numel()))
    full = {**ckpt.full, EXIT_VOCAB_KEY: ids.clone()}
    check_full_state_dict(full, ckpt.model, ee)
    return dataclasses.replace(ckpt, full=full, ee=ee)
