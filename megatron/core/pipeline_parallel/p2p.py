"""Point-to-point transfers between pipeline stages.

``PipelineP2P.exchange(sends, recvs)`` posts every send and receive of one schedule step as a single
``batch_isend_irecv`` and waits for all of them. Posting the pair "send my activation forward, receive
the gradient from the next stage" together is what keeps 1F1B's steady state free of deadlock: two
blocking calls in opposite order on neighbouring stages would wait on each other.

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
            req.wait()
        if device.type == "cuda":
            # batch_isend_irecv runs on NCCL's stream: make the compute stream wait before using the data.
            torch.cuda.current_stream().synchronize()
        return received


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous()
