"""Synthetic GPT samples for ``--mock-data``: deterministic from a seed, with structure a model can learn.

The tokens follow a sparse first-order Markov chain: every token has ``BRANCHES`` possible successors
(drawn once from the seed), taken with fixed skewed probabilities, so the best achievable loss is the
chain's entropy (about 1.0 nat) instead of ``log(vocab)``. When ``eod`` is given, documents end at random
points with an ``eod`` token and the next one restarts from a random token. Sample ``i`` depends only on
``(seed, i)``, so any rank can produce any sample.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["MockGPTDataset", "build_mock_train_valid_test_datasets"]

BRANCHES = 4
BRANCH_PROBS = (0.7, 0.1, 0.1, 0.1)
MEAN_DOC_LENGTH = 64


class MockGPTDataset(torch.utils.data.Dataset):
    """``num_samples`` samples ``{'text': int64[seq_length + 1]}`` with ids in ``[0, vocab_size)``."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int = 1234,
                 eod: int | None = None, name: str = "mock") -> None:
        if vocab_size < 2 or seq_length < 1 or num_samples < 0:
            raise ValueError(f"mock data needs vocab_size >= 2, seq_length >= 1 (got {vocab_size}, {seq_length})")
        if eod is not None and not 0 <= eod < vocab_size:
            raise ValueError(f"eod {eod} outside the vocabulary [0, {vocab_size})")
        self.name, self.num_samples, self.seq_length = name, num_samples, seq_length
        self.vocab_size, self.seed, self.eod = vocab_size, seed, eod
        self.desc = f"Mock GPT dataset {name} n={num_samples} s={seq_length} v={vocab_size} seed={seed} eod={eod}"
        words = np.array([t for t in range(vocab_size) if t != eod], dtype=np.int64)
        table = np.random.RandomState(seed).randint(0, len(words), size=(vocab_size, BRANCHES))
        self._successors = words[table].tolist()
        self._words = words

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.name} mock dataset of {self.num_samples}")
        n = self.seq_length + 1
        rng = np.random.default_rng([self.seed, idx])
        branch = rng.choice(BRANCHES, size=n, p=BRANCH_PROBS).tolist()
        restarts = rng.integers(0, len(self._words), size=n).tolist()
        ends = (rng.random(n) < 1.0 / MEAN_DOC_LENGTH).tolist() if self.eod is not None else [False] * n
        out = [0] * n
        token = int(self._words[restarts[0]])
        for t in range(n):
            out[t] = token
            if token == self.eod:
                token = int(self._words[restarts[t]])
            elif ends[t]:
                token = self.eod
            else:
                token = self._successors[token][branch[t]]
        return {"text": np.asarray(out, dtype=np.int64)}


def build_mock_train_valid_test_datasets(train_valid_test_num_samples, seq_length: int, vocab_size: int,
                                         seed: int = 1234, eod: int | None = None):
    """(train, valid, test) mock datasets with distinct seeds per split."""
    return tuple(
        MockGPTDataset(n, seq_length, vocab_size, seed + i, eod, name)
        for i, (name, n) in enumerate(zip(("train", "valid", "test"), train_valid_test_num_samples))
    )
