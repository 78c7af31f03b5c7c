"""Index builders with a C++ fast path and numpy fallbacks that return identical arrays.

``build_sample_idx`` maps each GPT sample to its starting (position in ``doc_idx``, token offset);
``build_blending_indices`` assigns each blended sample to a dataset. The C++ versions live in
``helpers.cpp`` (module ``megatron.data._helpers``, compiled by ``setup.py``); when it is not built the
numpy versions run instead. ``impl="cpp"`` / ``"numpy"`` forces one (tests compare them).
"""

from __future__ import annotations

import numpy as np

try:
    from megatron.data import _helpers as _cpp
except ImportError as exc:  # the extension is optional: the numpy versions give the same result
    _cpp = None
    CPP_IMPORT_ERROR: str | None = str(exc)
else:
    CPP_IMPORT_ERROR = None

__all__ = [
    "HAVE_CPP",
    "CPP_IMPORT_ERROR",
    "build_sample_idx",
    "build_sample_idx_numpy",
    "build_blending_indices",
    "build_blending_indices_numpy",
]

HAVE_CPP = _cpp is not None


def _pick(impl: str):
    if impl not in ("auto", "cpp", "numpy"):
        raise ValueError(f"impl must be 'auto', 'cpp' or 'numpy', got {impl!r}")
    if impl == "cpp" and _cpp is None:
        raise RuntimeError(
            f"megatron.data._helpers is not built ({CPP_IMPORT_ERROR}); run `python setup.py build_ext --inplace`"
        )
    return _cpp if impl == "cpp" or (impl == "auto" and _cpp is not None) else None


def build_sample_idx_numpy(sizes, doc_idx, seq_length: int, num_epochs: int, tokens_per_epoch: int) -> np.ndarray:
    """Vectorised form of Megatron's walk: sample k starts at token k * seq_length of the ``doc_idx``
    stream, and a position on a document's last token stays in that document (never "next doc, 0")."""
    sizes = np.asarray(sizes)
    doc_idx = np.asarray(doc_idx)
    if seq_length <= 0:
        raise ValueError("seq_length must be positive")
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    if num_samples < 0:
        raise ValueError("no tokens to build samples from")
    bounds = np.zeros(len(doc_idx) + 1, np.int64)
    np.cumsum(sizes[doc_idx], out=bounds[1:])
    if bounds[-1] < num_samples * seq_length + 1:
        raise IndexError("doc_idx exhausted: tokens_per_epoch too large")
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    # side="right" skips empty documents, as the walk does; only sample 0 is pinned to (0, 0) regardless.
    pos = np.searchsorted(bounds, starts, side="right") - 1
    out = np.empty((num_samples + 1, 2), np.int32)
    out[:, 0] = pos
    out[:, 1] = starts - bounds[pos]
    out[0] = 0
    return out


def build_sample_idx(sizes, doc_idx, seq_length: int, num_epochs: int, tokens_per_epoch: int,
                     impl: str = "auto") -> np.ndarray:
    """int32 ``[num_samples + 1, 2]`` with ``num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length``."""
    cpp = _pick(impl)
    if cpp is None:
        return build_sample_idx_numpy(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch)
    return cpp.build_sample_idx(np.ascontiguousarray(sizes, np.int32), np.ascontiguousarray(doc_idx, np.int32),
                                int(seq_length), int(num_epochs), int(tokens_per_epoch))


def build_blending_indices_numpy(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's largest-error rule in plain Python floats (IEEE doubles, the C++ arithmetic)."""
    w = [float(x) for x in np.asarray(weights, np.float64)]
    if not 1 <= len(w) <= 255:
        raise ValueError(f"blending needs 1 to 255 datasets, got {len(w)}")
    used = [0] * len(w)
    dataset_index = np.empty(size, np.uint8)
    sample_index = np.empty(size, np.int64)
    order = range(1, len(w))
    for i in range(size):
        x = float(i) if i > 1 else 1.0
        best, best_error = 0, w[0] * x - used[0]
        for d in order:
            error = w[d] * x - used[d]
            if error > best_error:
                best, best_error = d, error
        dataset_index[i] = best
        sample_index[i] = used[best]
        used[best] += 1
    return dataset_index, sample_index


def build_blending_indices(weights, size: int, impl: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(uint8 dataset index, int64 sample index within that dataset) for blended samples ``0..size-1``."""
    cpp = _pick(impl)
    if cpp is None:
        return build_blending_indices_numpy(weights, size)
    return cpp.build_blending_indices(np.ascontiguousarray(weights, np.float64), int(size))
