"""The training loader pins its batches exactly when CUDA is present (the host-to-device copy of a pinned
batch is then issued with ``non_blocking=True`` and overlaps queued kernels); on the CPU nothing is pinned."""

import torch

from megatron.data import samplers
from megatron.data.samplers import build_pretraining_data_loader


def _dataset():
    return [{"text": torch.arange(5)} for _ in range(8)]


def test_batches_are_pinned_only_where_cuda_is(monkeypatch):
    assert build_pretraining_data_loader(_dataset(), 0, 2, 0, 1).pin_memory is False
    monkeypatch.setattr(samplers.torch.cuda, "is_available", lambda: True)
    assert build_pretraining_data_loader(_dataset(), 0, 2, 0, 1).pin_memory is True
    assert build_pretraining_data_loader(_dataset(), 0, 2, 0, 1, pin_memory=False).pin_memory is False
