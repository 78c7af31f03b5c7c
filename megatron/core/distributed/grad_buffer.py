"""Data-parallel gradient reduction over contiguous, bucketed gradient buffers.

Each trainable parameter gets a ``main_grad`` that is a view into one flat buffer per dtype. Autograd's
per-parameter gradient is folded into ``main_grad`` by a post-accumulate hook (and then freed), so the
buffer accumulates over microbatches, optionally in fp32 for bf16/fp16 parameters
(``--accumulate-allreduce-grads-in-fp32``).

The buffer is cut into buckets of about ``bucket_size`` elements, filled in reverse registration order
(roughly the order backward produces gradients). When synchronisation is enabled (the last backward of a
step) a bucket's collective starts as soon as its last gradient arrives, overlapping communication with
the rest of the backward; :meth:`GradBuffers.finish_grad_sync` launches what is left and waits.

The collective is an all-reduce (plain data parallelism) or a reduce-scatter that leaves each rank the
reduced gradient of its own contiguous shard (the distributed optimizer): every buffer is padded to a
multiple of ``dp`` for that reason. Gradients are averaged over ``dp`` (Megatron's convention: the loss
is a per-replica mean).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.distributed as dist

from megatron.core.collectives import reduce_scatter_single

__all__ = ["GradBuffers", "Bucket"]


@dataclass
class Bucket:
    """A contiguous range ``[start, end)`` of one flat buffer and the parameters whose grads live there."""

    buffer: torch.Tensor
    start: int
    end: int
    params: list[torch.nn.Parameter]
    ready: set[int] = field(default_factory=set)  # ids of params whose grad arrived since sync was enabled
    handle: object | None = None
    scratch: torch.Tensor | None = None  # reduce-scatter output, copied into the buffer on wait
    late: bool = False  # started only by finish_grad_sync (see GradBuffers' late_params)

    @property
    def view(self) -> torch.Tensor:
        return self.buffer[self.start:self.end]

    def shard(self, dp: int, dp_rank: int) -> tuple[int, int]:
        """``[start, end)`` in buffer coordinates of ``dp_rank``'s reduce-scatter shard of this bucket."""
        size = (self.end - self.start) // dp
        return self.start + dp_rank * size, self.start + (dp_rank + 1) * size


class GradBuffers:
    """Contiguous ``main_grad`` buffers for ``params`` and their data-parallel reduction.

    Args:
        params: the model chunk's parameters (those without ``requires_grad`` are ignored).
        dp_group: data-parallel group (``None`` = dp 1: reduction is a no-op).
        dp: data-parallel size.
        grad_dtype: dtype of the buffers; ``None`` keeps each parameter's dtype.
        bucket_size: elements per bucket (a bucket always holds whole parameters).
        overlap: start a bucket's collective from the backward hooks as soon as it is complete.
        reduce_scatter: reduce-scatter instead of all-reduce (distributed optimizer).
        late_params: parameters whose gradients need another reduction first (tied copies summed over
            pipeline stages, sequence-parallel parameters summed over tp). They get buckets of their own
            that only :meth:`finish_grad_sync` starts, after the caller has done those reductions: a
            reduce-scatter leaves each rank a different shard, so nothing element-wise may follow it.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        dp_group: dist.ProcessGroup | None,
        dp: int,
        grad_dtype: torch.dtype | None = None,
        bucket_size: int = 40_000_000,
        overlap: bool = True,
        reduce_scatter: bool = False,
        late_params: Iterable[torch.nn.Parameter] = (),
    ) -> None:
        self.dp_group, self.dp = dp_group, dp
        self.overlap, self.reduce_scatter = overlap, reduce_scatter
        self.sync_enabled = False
        self.params = [p for p in params if p.requires_grad]
        self.buffers: dict[torch.dtype, torch.Tensor] = {}
        self.buckets: list[Bucket] = []
        self._bucket_of: dict[int, Bucket] = {}
        self._hooks = []
        late = {id(p) for p in late_params}
        self._build(grad_dtype, bucket_size, late)

    # ------------------------------------------------------------------ layout
    def _build(self, grad_dtype: torch.dtype | None, bucket_size: int, late: set[int]) -> None:
        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p in reversed(self.params):
            by_dtype.setdefault(grad_dtype or p.dtype, []).append(p)
        for dtype, params in by_dtype.items():
            groups, current, size = [], [], 0
            for p in params:
                if id(p) in late:
                    continue
                current.append(p)
                size += p.numel()
                if size >= bucket_size:
                    groups.append(current)
                    current, size = [], 0
            if current:
                groups.append(current)
            late_group = [p for p in params if id(p) in late]
            if late_group:
                groups.append(late_group)
            # Each bucket is padded to a multiple of dp so that it splits into equal reduce-scatter shards.
            spans, offset = [], 0
            for group in groups:
                n = sum(p.numel() for p in group)
                spans.append((offset, offset + -(-n // self.dp) * self.dp))
                offset = spans[-1][1]
            buffer = torch.zeros(offset, dtype=dtype, device=params[0].device)
            self.buffers[dtype] = buffer
            for group, (start, end) in zip(groups, spans):
                pos = start
                for p in group:
                    p.main_grad = buffer[pos:pos + p.numel()].view_as(p)
                    pos += p.numel()
                self._add_bucket(buffer, start, end, group, late=group is late_group)
        for p in self.params:
            self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))

    def _add_bucket(self, buffer, start, end, params, late: bool = False) -> None:
        bucket = Bucket(buffer, start, end, list(params), late=late)
        self.buckets.append(bucket)
        for p in params:
            self._bucket_of[id(p)] = bucket

    # ------------------------------------------------------------------ accumulation
    def _on_grad(self, param: torch.nn.Parameter) -> None:
        param.main_grad.add_(param.grad)
        param.grad = None
        if not self.sync_enabled:
            return
        bucket = self._bucket_of[id(param)]
        if bucket.handle is not None:
            raise RuntimeError(
                "a gradient arrived for a bucket whose reduction already started: grad sync must be enabled "
                "only for the last backward of each parameter in a step"
            )
        bucket.ready.add(id(param))
        if self.overlap and not bucket.late and len(bucket.ready) == len(bucket.params):
            self._launch(bucket)

    def zero_grad(self) -> None:
        for buffer in self.buffers.values():
            buffer.zero_()
        for bucket in self.buckets:
            bucket.ready.clear()
            bucket.handle = None
        self.sync_enabled = False

    # ------------------------------------------------------------------ reduction
    def start_grad_sync(self) -> None:
        """Enable reduction: call right before the last backward of the step (of this chunk)."""
        self.sync_enabled = True

    def _launch(self, bucket: Bucket) -> None:
        if self.dp_group is None:
            bucket.handle = _DONE
            return
        bucket.view.div_(self.dp)
        if self.reduce_scatter:
            # The output must not alias the input: reduce into a scratch shard, copied back on wait.
            lo, hi = bucket.shard(self.dp, dist.get_rank(self.dp_group))
            bucket.scratch = torch.empty_like(bucket.buffer[lo:hi])
            bucket.handle = reduce_scatter_single(bucket.scratch, bucket.view, group=self.dp_group, async_op=True)
        else:
            bucket.handle = dist.all_reduce(bucket.view, group=self.dp_group, async_op=True)

    def launch_remaining(self) -> None:
        """Start the reduction of every bucket not started yet (the chunk's backward is complete),
        except the late buckets."""
        for bucket in self.buckets:
            if bucket.handle is None and not bucket.late:
                self._launch(bucket)

    def finish_grad_sync(self) -> None:
        """Launch every bucket not yet launched (late ones included) and wait for all; ``main_grad`` then
        holds the dp-mean (with reduce-scatter: on this rank's shard of each bucket)."""
        for bucket in self.buckets:
            if bucket.handle is None:
                self._launch(bucket)
        for bucket in self.buckets:
            if bucket.handle is not _DONE:
                bucket.handle.wait()
                if bucket.scratch is not None:
                    lo, hi = bucket.shard(self.dp, dist.get_rank(self.dp_group))
                    bucket.buffer[lo:hi].copy_(bucket.scratch)
                    bucket.scratch = None
            bucket.handle = _DONE
        self.sync_enabled = False

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


_DONE = object()  # marks a bucket whose reduction needed no communication (dp = 1) or was waited on
