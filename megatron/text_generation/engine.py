"""InferenceEngine: this rank's model chunk, its place in the pipeline, and the transport of one step's messages.

The messages themselves (headers, payloads, reports) are typed in ``messages.py``; the protocol that
orders them, and recovers from failures, is ``runner.py``. Peers are addressed by stage through
:class:`PipelineP2P`, so it works under any tp and dp.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core.pipeline_parallel.p2p import PipelineP2P
from megatron.core.transformer import InferenceParams

from .messages import HEADER_LEN, RUN, SKIP, Header

__all__ = ["InferenceEngine"]


class InferenceEngine:
    """The model chunk of this rank (one (stage, chunk); interleaved pipelines are not supported for
    generation), its :class:`ParallelState`, the tokenizer and the configs."""

    def __init__(self, chunks, state, tokenizer, model_config, ee_config):
        chunks = list(chunks) if isinstance(chunks, (list, tuple)) else [chunks]
        if len(chunks) != 1:
            raise ValueError(f"generation runs one model chunk per rank, got {len(chunks)}; build the inference "
                             "model without --num-layers-per-virtual-pipeline-stage")
        self.model = chunks[0].eval()
        if self.model.sequence_parallel:
            raise ValueError("build the inference model with --sequence-parallel off")
        self.state, self.tokenizer = state, tokenizer
        self.config, self.ee_config = model_config, ee_config
        self.p2p = PipelineP2P(state) if state.pp > 1 else None
        self.device = state.device

    # ------------------------------------------------------------------ coordinates
    @property
    def stage(self) -> int:
        return self.state.pp_rank

    @property
    def is_first(self) -> bool:
        return self.state.is_first_stage

    @property
    def is_last(self) -> bool:
        return self.state.is_last_stage

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def vocab(self) -> int:
        """Ids below this are real tokens; the rest of the (padded) logits is never chosen."""
        return self.config.vocab_size

    @property
    def stage_exits(self) -> list[int]:
        return list(self.model.spec.exits)

    def new_cache(self, batch: int, length: int) -> InferenceParams:
        return InferenceParams(batch, length)

    # ------------------------------------------------------------------ messages
    def send_down(self, header: Header, payload: torch.Tensor | None = None,
                  hidden: torch.Tensor | None = None) -> None:
        nxt = self.stage + 1
        self.p2p.exchange(sends=[(header.pack(self.device), nxt)])
        if header.status not in (RUN, SKIP):  # END and FAILED headers travel alone
            return
        sends = [(payload, nxt)] + ([(hidden, nxt)] if hidden is not None else [])
        self.p2p.exchange(sends=sends)

    def recv_down(self, payload_len, batch: int,
                  hidden_len=None) -> tuple[Header, torch.Tensor | None, torch.Tensor | None]:
        """-> (header, payload, hidden); ``payload_len(header)`` gives the payload size, ``hidden_len(header)``
        the number of positions of the hidden states (default ``header.n``)."""
        prev = self.stage - 1
        (t,) = self.p2p.exchange(recvs=[((HEADER_LEN,), torch.float64, prev)])
        header = Header.unpack(t)
        if header.status not in (RUN, SKIP):
            return header, None, None
        recvs = [((payload_len(header),), torch.float64, prev)]
        if header.status == RUN:
            n = header.n if hidden_len is None else hidden_len(header)
            recvs.append(((n, batch, self.config.hidden_size), self.config.params_dtype, prev))
        got = self.p2p.exchange(recvs=recvs)
        return header, got[0], (got[1] if len(got) > 1 else None)

    def report(self, payload: torch.Tensor) -> None:
        self.p2p.exchange(sends=[(payload.double(), 0)])

    def recv_report(self, stage: int, size: int) -> torch.Tensor:
        (t,) = self.p2p.exchange(recvs=[((size,), torch.float64, stage)])
        return t

    def broadcast_from_first(self, obj):
        """Stage 0's ``obj`` on every stage of this rank's pipeline."""
        if self.state.pp_group is None:
            return obj
        box = [obj if self.is_first else None]
        device = self.device if self.state.backend == "nccl" else None
        dist.broadcast_object_list(box, src=self.state.stage_rank(0), group=self.state.pp_group, device=device)
        return box[0]

    def agree_seed(self, seed: int | None) -> int:
        """The request's seed, or (when None) one drawn here and agreed on by every rank of the model."""
        if seed is not None:
            return int(seed)
        t = torch.randint(0, 2**31 - 1, (1,), dtype=torch.long).to(self.device)
        if self.state.mp_group is not None:
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.state.mp_group)
        return int(t.item())
