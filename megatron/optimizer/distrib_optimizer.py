"""The distributed optimizer (``--use-distributed-optimizer``): optimizer state and fp32 masters sharded over dp.

The gradient buffers reduce-scatter (``GradBuffers(reduce_scatter=True)``): each bucket is cut into ``dp``
equal contiguous shards and data-parallel rank ``r`` receives the reduced gradient of shard ``r`` only.
This optimizer owns exactly those shards: for every parameter piece inside its shard it keeps a flat
fp32 master and the torch optimizer state (Adam moments), so each rank holds about ``1/dp`` of the state.
After stepping its pieces a rank writes them into its model parameters and every bucket's parameters are
all-gathered over dp, leaving all replicas with identical full weights.

Model-wide reductions (inf/nan check, grad norm, zero count) combine the disjoint shards over the
model-parallel group and then the data-parallel group. The numerics equal the plain optimizer's: Adam
and SGD are element-wise, and the norm sums the same squares in another order.

Checkpoints hold this rank's shard (``state_dict`` per dp rank) with its layout; they load back at the
same data-parallel size and model.
"""

from __future__ import annotations

import torch

from megatron.core.collectives import all_gather_single
from megatron.core.distributed.grad_buffer import Bucket, GradBuffers
from megatron.core.parallel_state import ParallelState
from megatron.optimizer.config import OptimizerConfig
from megatron.optimizer.grad_scaler import GradScaler
from megatron.optimizer.optimizer import MixedPrecisionOptimizer, Slot, make_master
from megatron.optimizer.param_groups import counted_once

__all__ = ["DistributedOptimizer"]


def _overlaps(bucket: Bucket, lo: int, hi: int):
    """``(param, a, b)`` for each parameter of ``bucket`` meeting buffer range ``[lo, hi)``; ``[a, b)`` is
    the overlap in the parameter's own flat coordinates. ``main_grad`` is a view of the bucket's buffer,
    so its storage offset is the parameter's position in the buffer."""
    for p in bucket.params:
        start = p.main_grad.storage_offset() - bucket.buffer.storage_offset()
        a, b = max(lo, start), min(hi, start + p.numel())
        if a < b:
            yield p, a - start, b - start


class DistributedOptimizer(MixedPrecisionOptimizer):
    """:class:`MixedPrecisionOptimizer` over this dp rank's reduce-scatter shard of ``grad_buffers`` (one
    :class:`GradBuffers` per model chunk, built with ``reduce_scatter=True``)."""

    def __init__(self, param_groups: list[dict], config: OptimizerConfig, state: ParallelState,
                 grad_buffers: list[GradBuffers], grad_scaler: GradScaler | None = None):
        for gb in grad_buffers:
            if not gb.reduce_scatter or gb.dp != state.dp:
                raise ValueError(
                    "--use-distributed-optimizer needs GradBuffers(reduce_scatter=True) over the data-parallel "
                    f"group of size {state.dp}; got reduce_scatter={gb.reduce_scatter}, dp={gb.dp}"
                )
        self.grad_buffers = list(grad_buffers)
        super().__init__(param_groups, config, state, grad_scaler)

    @property
    def reduce_groups(self) -> list:
        return [self.state.mp_group, self.state.dp_group]

    def _build_slots(self, param_groups: list[dict]) -> list[Slot]:
        where = {}
        for gi, g in enumerate(param_groups):
            for p in g["params"]:
                where[id(p)] = (gi, len(where))
        buffered = {id(p) for gb in self.grad_buffers for p in gb.params}
        missing = [i for pid, (_, i) in where.items() if pid not in buffered]
        extra = buffered - set(where)
        if missing or extra:
            raise ValueError(
                f"the optimizer's parameters and the gradient buffers' differ ({len(missing)} without a buffer, "
                f"{len(extra)} buffered but not optimised); build both over the same trainable parameters"
            )
        slots = []
        for gb in self.grad_buffers:
            for bucket in gb.buckets:
                lo, hi = bucket.shard(self.state.dp, self.state.dp_rank)
                for p, a, b in _overlaps(bucket, lo, hi):
                    gi, index = where[id(p)]
                    slots.append(Slot(p, index, gi, a, b, make_master(p, a, b, flat=True),
                                      counted_once(p, self.state.tp_rank)))
        slots.sort(key=lambda s: (s.group, s.index, s.lo))
        return slots

    def _layout_description(self) -> str:
        return f"the distributed optimizer at dp={self.state.dp} (dp rank {self.state.dp_rank})"

    def _copy_masters_to_model(self) -> None:
        super()._copy_masters_to_model()
        self._all_gather_params()

    @torch.no_grad()
    def _all_gather_params(self) -> None:
        """Every dp rank contributes its updated shard of each bucket; all ranks end with the full weights."""
        group, dp = self.state.dp_group, self.state.dp
        if group is None:
            return
        pending = []
        for gb in self.grad_buffers:
            for bucket in gb.buckets:
                # Gather in the parameters' dtype when they share one, else in the (fp32) buffer dtype,
                # which holds every parameter dtype exactly.
                dtypes = {p.dtype for p in bucket.params}
                dtype = dtypes.pop() if len(dtypes) == 1 else bucket.buffer.dtype
                lo, hi = bucket.shard(dp, self.state.dp_rank)
                local = torch.zeros(hi - lo, dtype=dtype, device=self.device)
                for p, a, b in _overlaps(bucket, lo, hi):
                    start = p.main_grad.storage_offset() - bucket.buffer.storage_offset()
                    local[start + a - lo:start + b - lo] = p.detach().view(-1)[a:b]
                full = torch.empty(bucket.end - bucket.start, dtype=dtype, device=self.device)
                handle = all_gather_single(full, local, group=group, async_op=True)
                pending.append((bucket, full, handle))
        for bucket, full, handle in pending:
            handle.wait()
            for p, a, b in _overlaps(bucket, bucket.start, bucket.end):
                start = p.main_grad.storage_offset() - bucket.buffer.storage_offset()
                p.detach().view(-1).copy_(full[start - bucket.start:start - bucket.start + p.numel()])
