"""Samplers: data-parallel sharding, and restarting at consumed samples k continues an uninterrupted run."""

import itertools

import numpy as np
import pytest
import torch

from megatron.data.samplers import (
    MegatronPretrainingRandomSampler,
    MegatronPretrainingSampler,
    build_data_iterator,
    build_pretraining_data_loader,
    train_valid_test_num_samples,
)


def _global_batches(make, dp, steps):
    """Per step, the concatenation of every dp rank's micro-batch (what the whole job consumed)."""
    iters = [iter(make(r)) for r in range(dp)]
    return [sum((next(it) for it in iters), []) for _ in range(steps)]


@pytest.mark.parametrize("dp", [1, 2])
def test_single_sampler_resume(dp):
    mbs, total = 3, 50
    full = _global_batches(lambda r: MegatronPretrainingSampler(total, 0, mbs, r, dp), dp, total // (mbs * dp))
    assert sum(full, []) == list(range(len(full) * mbs * dp))  # in order, nothing skipped or repeated
    for step in range(len(full)):
        k = step * mbs * dp
        resumed = _global_batches(lambda r: MegatronPretrainingSampler(total, k, mbs, r, dp), dp, len(full) - step)
        assert resumed == full[step:]


def test_single_sampler_rank_slices_and_last_batch():
    assert list(MegatronPretrainingSampler(10, 0, 2, 1, 2)) == [[2, 3], [6, 7]]
    assert list(MegatronPretrainingSampler(10, 0, 2, 1, 2, drop_last=False)) == [[2, 3], [6, 7], []]
    assert list(MegatronPretrainingSampler(10, 0, 2, 0, 2, drop_last=False))[-1] == [8, 9]
    with pytest.raises(ValueError, match="nothing left to train on"):
        MegatronPretrainingSampler(10, 10, 2, 0, 1)
    with pytest.raises(ValueError, match="rank 2 outside"):
        MegatronPretrainingSampler(10, 0, 2, 2, 2)


@pytest.mark.parametrize("dp,sharding", [(1, True), (2, True), (2, False)])
def test_random_sampler_resume_across_epochs(dp, sharding):
    mbs, total = 2, 21
    per_epoch = total // (mbs * dp)
    steps = 3 * per_epoch

    def run(consumed, n):
        samplers = [MegatronPretrainingRandomSampler(None, total, consumed, mbs, r, dp, sharding) for r in range(dp)]
        return _global_batches(lambda r: itertools.chain.from_iterable(itertools.repeat(samplers[r])), dp, n)

    full = run(0, steps)
    for e in range(3):
        epoch = sum(full[e * per_epoch:(e + 1) * per_epoch], [])
        assert len(set(epoch)) == len(epoch) and max(epoch) < total  # a permutation within each epoch
    assert full[:per_epoch] != full[per_epoch:2 * per_epoch]  # reshuffled each epoch
    for step in (1, per_epoch - 1, per_epoch, per_epoch + 2):
        assert run(step * mbs * dp, steps - step) == full[step:]


def test_data_loader_yields_the_sampled_items():
    data = [{"text": np.arange(4) + 10 * i} for i in range(20)]
    loader = build_pretraining_data_loader(data, 6, 2, 1, 2)
    first = next(iter(loader))["text"]
    assert isinstance(first, torch.Tensor) and first[:, 0].tolist() == [80, 90]
    cyclic = build_data_iterator(build_pretraining_data_loader(data, 0, 5, 0, 1, dataloader_type="cyclic"), "cyclic")
    assert len([next(cyclic) for _ in range(9)]) == 9  # keeps going past the 4 batches of one epoch
    assert build_pretraining_data_loader(None, 0, 1, 0, 1) is None
    with pytest.raises(ValueError, match="--dataloader-type"):
        build_pretraining_data_loader(data, 0, 1, 0, 1, dataloader_type="bogus")


def test_num_samples_per_split():
    assert train_valid_test_num_samples(100, 8, 10, 5) == [800, 11 * 5 * 8, 40]
