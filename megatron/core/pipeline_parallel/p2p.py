"""Point-to-point transfers between pipeline stages.

``PipelineP2P.exchange(sends, recvs)`` posts every send and receive of one schedule step as a single
``batch_isend_irecv`` and waits for all of them. Posting the pair "send my activation forward, receive
the gradient from the next stage" together is what keeps 1F1B's steady state free of deadlock: two
blocking calls in opposite order on neighbouring stages would wait on each other.

CUDA stream semantics (why there is no host synchronisation here). Under NCCL, ``batch_isend_irecv``
enqueues the whole group on NCCL's internal stream after making that stream wait for the current
(compute) stream, so a send reads its tensor only once the kernels producing it have run. ``wait()`` on
the returned work objects does not block the host: it makes the *current* stream wait for the NCCL
stream, so every kernel queued afterwards (the next forward reading a received activation, an optimizer
step overwriting a sent one) runs after the transfer; a sent tensor freed after the call is reused by
the caching allocator only for kernels of that same stream, which now come after the transfer. A host wait would only be needed if the host itself
read the received values, which nothing here does (``.item()`` / ``.cpu()`` synchronise by themselves).
Under gloo ``wait()`` blocks the host until the transfer is done.

The first operation on an NCCL group must not be a batched P2P that only some ranks join (undefined in
PyTorch, a hang risk): ``ParallelState.build`` ends with an all-reduce over the world for that reason.

Peers are addressed by pipeline stage; this rank's pipeline (``ParallelState.pp_ranks``) maps them to
global ranks, so the same code works for any tp and dp (EE-LLM's inference passed stage numbers where
torch expects global ranks, which only worked at tp = dp = 1).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from megatron.core.parallel_state import ParallelState

__all__ = ["PipelineP2P", "RecvSpec"]

RecvSpec = tuple[tuple[int, ...], torch.dtype, int]  # (shape, dtype, source stage)


class PipelineP2P:
    """Batched sends/receives along this rank's pipeline."""

    def __init__(self, state: ParallelState) -> None:
        self.state = state

    def exchange(
        self,
        sends: Sequence[tuple[torch.Tensor, int]] = (),
        recvs: Sequence[RecvSpec] = (),
    ) -> list[torch.Tensor]:
        """Send each ``(tensor, dst_stage)`` and receive each ``(shape, dtype, src_stage)``; returns the
        received tensors in order. All operations are posted in one batch and waited on together."""
        if not sends and not recvs:
            return []
        device = self.state.device
        received = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype, _ in recvs]
        ops = [
            dist.P2POp(dist.isend, _contiguous(t), self.state.stage_rank(dst))
            for t, dst in sends
        ]
        ops += [
            dist.P2POp(dist.irecv, buf, self.state.stage_rank(src))
            for buf, (_, _, src) in zip(received, recvs)
        ]
        for req in dist.batch_isend_irecv(ops):
            req.wait()  # NCCL: orders the current stream after the transfers (see the module docstring)
        return received


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous()
