"""Blending several datasets by weight (``--data-path w1 p1 w2 p2 ...``), as Megatron does.

Blended sample ``i`` comes from the dataset whose count lags most behind its weight (largest
``w_d * max(i, 1) - used_d``, first maximum on ties) and is that dataset's next unused sample. Each
dataset is built with ``ceil(n * w * 1.005)`` samples so that the greedy assignment never runs past one.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from megatron.data.helpers import build_blending_indices
from megatron.data.index_cache import cached_arrays

__all__ = ["BlendableDataset", "parse_blend", "OVERSAMPLE"]

OVERSAMPLE = 1.005


def parse_blend(data_prefix: Sequence, num_samples: Sequence[int]):
    """``[w1, p1, w2, p2, ...]`` -> (prefixes, normalised weights, per-dataset sample counts).

    ``num_samples`` holds one count per split; each dataset gets ``ceil(n * w * 1.005)`` of each."""
    items = [str(x).strip() for x in data_prefix]
    if len(items) % 2:
        raise ValueError(
            f"--data-path with several datasets takes weight/prefix pairs (w1 p1 w2 p2 ...), got {len(items)} items"
        )
    try:
        weights = [float(w) for w in items[0::2]]
    except ValueError:
        raise ValueError(f"--data-path weights must be numbers, got {items[0::2]}") from None
    if min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"--data-path weights must be non-negative with a positive sum, got {weights}")
    total = sum(weights)
    weights = [w / total for w in weights]
    counts = [[int(math.ceil(n * w * OVERSAMPLE)) for n in num_samples] for w in weights]
    return items[1::2], weights, counts


class BlendableDataset(torch.utils.data.Dataset):
    """``size`` samples drawn from ``datasets`` in proportion to ``weights``; items carry ``dataset_idx``."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int, *,
                 data_cache_path: str | None = None, group=None) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.datasets = list(datasets)
        self.size = int(size)
        w = np.asarray(weights, dtype=np.float64)
        w = w / w.sum()
        self.desc = "Blendable dataset\n\nDatasets:\n"
        self.desc += "".join(getattr(d, "desc", repr(d)) + "\n\n" for d in datasets)
        self.desc += f"Weights: {w}\nSize: {self.size}\n"
        build = lambda: dict(zip(("index", "sample_index"), build_blending_indices(w, self.size)))  # noqa: E731
        if data_cache_path:
            arrays, _ = cached_arrays(self.desc, ["index", "sample_index"], build, [data_cache_path], group=group)
        else:
            arrays = build()
        self.dataset_index, self.dataset_sample_index = arrays["index"], arrays["sample_index"]
        for d, ds in enumerate(self.datasets):
            used = int(np.count_nonzero(self.dataset_index == d))
            if used > len(ds):
                raise ValueError(
                    f"blending needs {used} samples of dataset {d} but it has {len(ds)}; "
                    "build each dataset with ceil(n * w * 1.005) samples (parse_blend)"
                )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> dict:
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} out of range for a blend of {self.size} samples")
        d = int(self.dataset_index[idx])
        return {"dataset_idx": d, **self.datasets[d][int(self.dataset_sample_index[idx])]}
