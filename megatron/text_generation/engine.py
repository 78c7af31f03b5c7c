"""InferenceEngine: this rank's model chunk, its place in the pipeline, and the messages of one step.

Every step of every decoding strategy is driven by pipeline stage 0 and follows one protocol:
1. stage ``s`` sends stage ``s + 1`` a :class:`Header` (float64 ``[HEADER_LEN]``), then one exchange
   holding the step's payload (mode-dependent: the per-sequence :class:`~.early_exit.Carry`, scoring
   targets or beam parents) and, when the step runs, the hidden states ``[n, b, h]``;
2. the result (:data:`MODE_GEN`: tokens and exit layers; scoring log-probs; beam candidates; speculative
   drafts and verdicts) reaches stage 0 as a report from the last stage, or under method B from the first
   stage where every sequence has decided (the stages before it send "continue" reports, the stages after
   it send none), or for a speculative draft (:data:`MODE_DRAFT`) from the draft exit's stage, where the
   step ends (see ``speculative.py``).
Peers are addressed by stage through :class:`PipelineP2P`, so it works under any tp and dp.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

import torch
import torch.distributed as dist

from megatron.core.pipeline_parallel.p2p import PipelineP2P
from megatron.core.transformer import InferenceParams

__all__ = ["InferenceEngine", "Header", "HEADER_LEN", "RUN", "SKIP", "END", "MODE_GEN", "MODE_SCORE", "MODE_BEAM",
           "MODE_DRAFT", "MODE_VERIFY"]

RUN, SKIP, END = 0, 1, 2
MODE_GEN, MODE_SCORE, MODE_BEAM, MODE_DRAFT, MODE_VERIFY = 0, 1, 2, 3, 4


@dataclass
class Header:
    """``status``: RUN, SKIP (method A: every sequence exited upstream; later stages skip the token) or
    END (generation over). ``n`` new positions written at KV ``offset``; ``step`` counts generated tokens
    (top-p decay); ``reorder``: reorder the KV rows by the payload's beam parents first; ``reported``:
    stage 0 already has this step's result; ``force_full``: no stage may skip layers (``recompute_cap``);
    ``draft``: the number of drafted tokens a speculative verify step checks."""

    status: int = RUN
    mode: int = MODE_GEN
    n: int = 0
    offset: int = 0
    step: int = 0
    reorder: int = 0
    reported: int = 0
    force_full: int = 0
    draft: int = 0

    def pack(self, device) -> torch.Tensor:
        return torch.tensor(astuple(self), dtype=torch.float64, device=device)

    @classmethod
    def unpack(cls, t: torch.Tensor) -> "Header":
        return cls(*(int(round(v)) for v in t.tolist()))


HEADER_LEN = len(astuple(Header()))


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
        if header.status == END:
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
        if header.status == END:
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
