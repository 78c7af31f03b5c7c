"""Data-parallel batch samplers that resume from a consumed-sample count, and the data loaders built on them.

``MegatronPretrainingSampler`` (``--dataloader-type single``) walks samples ``consumed, consumed + 1, ...``
in global batches of ``micro_batch_size * dp``; data-parallel rank r takes the r-th micro-batch of each.
Restarting with ``consumed_samples = k`` therefore continues exactly where a run stopped after k samples.

``MegatronPretrainingRandomSampler`` (``--dataloader-type cyclic``) reshuffles every epoch with
``torch.randperm`` seeded by the epoch number; resuming skips the part of the current epoch's permutation
already consumed. With ``data_sharding`` each rank draws from its own contiguous bucket.
"""

from __future__ import annotations

import signal
from typing import Iterable, Iterator

import torch

__all__ = [
    "MegatronPretrainingSampler",
    "MegatronPretrainingRandomSampler",
    "build_pretraining_data_loader",
    "build_data_iterator",
    "cyclic_iter",
    "train_valid_test_num_samples",
]


def _check(total_samples, consumed_samples, micro_batch_size, dp_rank, dp_size, strict_consumed=True):
    if total_samples <= 0:
        raise ValueError(f"no samples to consume: the dataset has {total_samples}")
    if strict_consumed and consumed_samples >= total_samples:
        raise ValueError(
            f"consumed samples {consumed_samples} >= dataset size {total_samples}: nothing left to train on; "
            "build the dataset for more samples (raise --train-iters/--train-samples)"
        )
    if micro_batch_size <= 0 or dp_size <= 0:
        raise ValueError(f"--micro-batch-size ({micro_batch_size}) and the dp size ({dp_size}) must be positive")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"data-parallel rank {dp_rank} outside [0, {dp_size})")


class MegatronPretrainingSampler:
    """Yields this rank's micro-batches of sample indices, in order, from ``consumed_samples`` on."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, drop_last: bool = True) -> None:
        _check(total_samples, consumed_samples, micro_batch_size, dp_rank, dp_size)
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.global_micro_batch = micro_batch_size * dp_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        return self.total_samples

    def _mine(self, batch: list[int]) -> list[int]:
        start = self.dp_rank * self.micro_batch_size
        return batch[start:start + self.micro_batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        for idx in range(self.consumed_samples, self.total_samples):
            batch.append(idx)
            if len(batch) == self.global_micro_batch:
                yield self._mine(batch)
                batch = []
        if batch and not self.drop_last:
            yield self._mine(batch)


class MegatronPretrainingRandomSampler:
    """Epoch-wise shuffled micro-batches; the trailing partial global batch of each epoch is dropped."""

    def __init__(self, dataset, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, data_sharding: bool = True) -> None:
        _check(total_samples, consumed_samples, micro_batch_size, dp_rank, dp_size, strict_consumed=False)
        self.dataset = dataset
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.data_sharding = data_sharding
        self.global_micro_batch = micro_batch_size * dp_size
        self.last_batch_size = total_samples % self.global_micro_batch
        if total_samples < self.global_micro_batch:
            raise ValueError(f"dataset of {total_samples} samples is smaller than one global micro-batch "
                             f"({self.global_micro_batch})")

    def __len__(self) -> int:
        return self.total_samples

    def __iter__(self) -> Iterator[list[int]]:
        active = self.total_samples - self.last_batch_size
        epoch, in_epoch = divmod(self.consumed_samples, active)
        if in_epoch % self.global_micro_batch:
            raise ValueError(f"consumed samples {self.consumed_samples} is not a whole number of global micro-batches "
                             f"({self.global_micro_batch})")
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        g = torch.Generator()
        g.manual_seed(epoch)
        if self.data_sharding:
            bucket = (self.total_samples // self.global_micro_batch) * self.micro_batch_size
            start = self.dp_rank * bucket
            perm = torch.randperm(bucket, generator=g).tolist()
            idx_range = [start + x for x in perm[in_epoch // self.dp_size:]]
        else:
            full = (self.total_samples // self.micro_batch_size) * self.micro_batch_size
            perm = torch.randperm(full, generator=g).tolist()
            idx_range = perm[in_epoch:][self.dp_rank::self.dp_size]
        batch: list[int] = []
        for idx in idx_range:
            batch.append(idx)
            if len(batch) == self.micro_batch_size:
                self.consumed_samples += self.global_micro_batch
                yield batch
                batch = []


def _worker_ignores_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: SIGTERM and SIGINT are for the training process, not its workers.

    ``scancel``, preemption and torchrun (which signals each rank's whole process group) deliver SIGTERM to
    the workers too; a worker killed by it makes the main process raise "DataLoader worker ... is killed by
    signal" before ``--exit-signal-handler`` can save. Ignoring it keeps the loader alive until the main
    process shuts it down (or dies: the workers notice a dead parent and exit on their own)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_pretraining_data_loader(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                                  dp_size: int, *, dataloader_type: str = "single", num_workers: int = 0,
                                  data_sharding: bool = True, pin_memory: bool | None = None):
    """A ``torch.utils.data.DataLoader`` over ``dataset`` driven by a Megatron sampler (None for no dataset)."""
    if dataset is None:
        return None
    if dataloader_type == "single":
        sampler = MegatronPretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    elif dataloader_type == "cyclic":
        sampler = MegatronPretrainingRandomSampler(dataset, len(dataset), consumed_samples, micro_batch_size,
                                                   dp_rank, dp_size, data_sharding)
    else:
        raise ValueError(f"--dataloader-type {dataloader_type!r} is not supported; use 'single' or 'cyclic'")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=pin_memory, persistent_workers=num_workers > 0,
                                       worker_init_fn=_worker_ignores_stop_signals if num_workers > 0 else None)


def cyclic_iter(iterable: Iterable) -> Iterator:
    """Restart ``iterable`` forever (the cyclic sampler advances its epoch on each pass)."""
    while True:
        yield from iterable


def build_data_iterator(loader, dataloader_type: str = "single"):
    """Megatron's train/valid/test iterators: plain for 'single', endless for 'cyclic'; None stays None."""
    if loader is None:
        return None
    return iter(cyclic_iter(loader)) if dataloader_type == "cyclic" else iter(loader)


def train_valid_test_num_samples(train_iters: int, global_batch_size: int, eval_interval: int,
                                 eval_iters: int) -> list[int]:
    """Samples each split must provide: every training step, ``eval_iters`` batches at each evaluation
    (one every ``eval_interval`` steps plus a final one) and ``eval_iters`` batches of test."""
    evaluations = train_iters // eval_interval + 1
    return [train_iters * global_batch_size, evaluations * eval_iters * global_batch_size,
            eval_iters * global_batch_size]
