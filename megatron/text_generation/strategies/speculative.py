"""Self-speculative decoding on one pipeline stage: drafting with an exit, verifying with the full model.

A round (driven by stage 0, see ``speculative_loop.py``) is ``k`` draft steps and one verify step.
Let ``F`` be the first position whose KV is not complete in every layer and ``c`` the next position to
predict (the token at ``c - 1`` is known but not yet fed past the draft exit ``E``):

- draft step ``i`` (:data:`MODE_DRAFT`) feeds positions ``[F, c)`` (``i = 0``) or ``c + i - 1`` through
  layers ``1..E`` only (the model's layer range ``(0, E)``), on the stages up to E's; E's stage keeps the
  layer-``E`` output of every fed position (the *window*), and draws draft ``i`` from exit ``E``'s head
  (reported to stage 0);
- the verify step (:data:`MODE_VERIFY`) feeds the last draft through layers ``1..E`` (the stages up to
  E's), then layers ``E+1..L`` (range ``(E, L)``) run ONCE over the whole window ``[F, c + k)`` at KV
  offset ``F``: layers ``<= E`` are never recomputed (the KV the drafts wrote there is exactly what a
  full forward writes); the last stage takes the full model's logits of positions ``c - 1 .. c + k - 1``
  and applies the acceptance rule (``acceptance.py``); its verdict goes to stage 0.

Rejected positions are rolled back by the offsets alone: the next round starts at ``F' = c + m`` and
overwrites every cached position from there on before anything reads it. Under sampling E's stage keeps
each draft's distribution ``q`` and, when it is not the last stage, sends them straight to the last
stage after passing the verify step down. Only exit ``E`` is computed (on the drafts' last positions);
the other exits' heads never run, and every backbone layer's cache ends as a full-depth decode's would.
"""

from __future__ import annotations

import torch

from ..messages import FAILED, MODE_DRAFT, MODE_VERIFY, RUN, Drafts, Fed, Header, VerdictReport, VerifyPayload
from ..runner import StageRunner, Step
from ..sampling import ACCEPT, DRAFT, RESIDUAL, draw_from, is_greedy, sampling_probs, token_logprobs
from .acceptance import verify_greedy, verify_sampled

__all__ = ["SpeculativeRunner"]


class SpeculativeRunner(StageRunner):
    """One speculative generation's per-rank state: the KV cache of this rank's layers, the window of
    layer-``E`` outputs and the round's draft distributions (E's stage), and the token rules.
    ``newline_ban``: as the :class:`~.early_exit.TokenPicker`'s; ``draws``: the request's random numbers."""

    def __init__(self, eng, batch: int, max_len: int, draft_exit: int, sampling, draws, newline_ban=None):
        super().__init__(eng, batch, max_len)
        self.exit, self.sampling, self.draws, self.newline_ban = draft_exit, sampling, draws, newline_ban
        self.exit_stage = eng.model.partition.owner(draft_exit).stage
        self.sampled = not is_greedy(sampling)
        self.window: torch.Tensor | None = None  # layer-E outputs of positions [window_start, ...)
        self.window_start = 0
        self.q: list[torch.Tensor] = []  # this round's draft distributions [b, V] (sampling, E's stage)

    # ------------------------------------------------------------------ message sizes and routes
    def payload_len(self, header: Header) -> int:
        return Fed.size(self.b) if header.mode == MODE_DRAFT else VerifyPayload.size(self.b, header.draft)

    def read_payload(self, header: Header, t: torch.Tensor):
        return Fed.unpack(t) if header.mode == MODE_DRAFT else VerifyPayload.unpack(t, self.b, header.draft)

    def report_len(self, header: Header) -> int:
        return Drafts.size(self.b) if header.mode == MODE_DRAFT else VerdictReport.size(self.b, header.draft)

    def read_report(self, header: Header, t: torch.Tensor):
        return Drafts.unpack(t) if header.mode == MODE_DRAFT else VerdictReport.unpack(t, self.b)

    def hidden_len(self, header: Header) -> int:
        """Positions this stage receives: a verify step carries only the last draft up to E's stage."""
        return 1 if header.mode == MODE_VERIFY and self.eng.stage - 1 < self.exit_stage else header.n

    def ends_here(self, header: Header) -> bool:
        return self.eng.is_last or (header.mode == MODE_DRAFT and self.eng.stage == self.exit_stage)

    def report_sources(self, header: Header) -> list[int]:
        return [self.exit_stage if header.mode == MODE_DRAFT else self.eng.state.pp - 1]

    def _q_travels(self, header: Header) -> bool:
        return header.mode == MODE_VERIFY and self.sampled and self.exit_stage != self.eng.state.pp - 1

    def before_step(self, header: Header) -> None:
        """The last stage receives the drafts' distributions whenever E's stage sent them: on a running
        verify step, or on a failed one whose failure arose after E's stage."""
        sent = header.status == RUN or (header.status == FAILED and header.failed_at > self.exit_stage)
        if self.eng.is_last and self._q_travels(header) and sent:
            (q,) = self.eng.p2p.exchange(recvs=[((header.draft, self.b, self.eng.vocab), torch.float32,
                                                  self.exit_stage)])
            self.q = list(q.unbind(0))

    def after_send(self, header: Header) -> None:
        if header.status == RUN and self._q_travels(header) and self.eng.stage == self.exit_stage:
            self.eng.p2p.exchange(sends=[(torch.stack(self.q), self.eng.state.pp - 1)])
            self.q = []

    # ------------------------------------------------------------------ the steps
    def step(self, header: Header, payload, ids=None, hidden=None) -> Step:
        if header.mode == MODE_DRAFT:
            hidden_out, report = self._draft(header, payload, ids, hidden)
        else:
            hidden_out, report = self._verify(header, payload, ids, hidden)
        return Step(header, payload, hidden_out, report)

    def _forward(self, offset: int, layers, ids=None, hidden=None, **kw):
        self.kv.sequence_len_offset = offset
        return self.eng.model.infer(ids, inference_params=self.kv, hidden_states=hidden, layers=layers, **kw)

    def _draft(self, header: Header, payload: Fed, ids, hidden):
        if self.eng.stage < self.exit_stage:
            return self._forward(header.offset, (0, self.exit), ids, hidden).hidden, None
        out = self._forward(header.offset, (0, self.exit), ids, hidden, exits=(self.exit,), num_last=1)
        self._keep(header.offset, out.hidden)
        x = self._ban(out.exits[self.exit].logits(), payload.ids)
        if self.sampled:
            q = sampling_probs(x, self.sampling, header.step)
            self.q.append(q)
            drafts = draw_from(q, self.draws.uniform(DRAFT, self._seqs(), header.step))
        else:
            drafts = x.argmax(dim=-1)
        return None, Drafts(drafts)

    def _verify(self, header: Header, payload: VerifyPayload, ids, hidden):
        start, stage = header.offset, self.eng.stage
        fresh_at = start + header.n - 1  # the last draft: not yet through layers 1..E
        last = header.draft + 1 if self.eng.is_last else None
        if stage < self.exit_stage:
            return self._forward(fresh_at, (0, self.exit), ids, hidden).hidden, None
        if stage == self.exit_stage:
            self._keep(fresh_at, self._forward(fresh_at, (0, self.exit), ids, hidden).hidden)
            h = self.window[start - self.window_start:]
            self.window, self.window_start = h, start  # positions before F are complete: drop them
            out = self._forward(start, (self.exit, self.eng.num_layers), hidden=h, num_last=last)
        else:
            out = self._forward(start, None, hidden=hidden, num_last=last)
        if not self.eng.is_last:
            return out.hidden, None
        return None, self._judge(out.final, payload, header)

    def _judge(self, final, payload: VerifyPayload, header: Header) -> VerdictReport:
        """The last stage: the full model's verdict on the drafts."""
        k, fed = header.draft, payload.fed
        x = final.per_sequence(final.logits())  # [b, k + 1, V]
        x = torch.stack([self._ban(x[:, i], fed[:, i]) for i in range(k + 1)], dim=1)
        drafts = fed[:, 1:]
        if self.sampled:
            p = torch.stack([sampling_probs(x[:, i], self.sampling, header.step + i) for i in range(k + 1)], dim=1)
            seqs = self._seqs()
            accept = torch.stack([self.draws.uniform(ACCEPT, seqs, header.step + i) for i in range(k)], dim=1)
            residual = torch.stack([self.draws.uniform(RESIDUAL, seqs, header.step + i) for i in range(k + 1)], dim=1)
            verdict = verify_sampled(p, torch.stack(self.q, dim=1), drafts, payload.free, accept, residual)
        else:
            verdict = verify_greedy(x, drafts, payload.free)
        self.q = []
        logprobs = token_logprobs(x, verdict.tokens)
        return VerdictReport(verdict.accepted, verdict.tokens, logprobs, verdict.from_draft)

    # ------------------------------------------------------------------ helpers
    def _seqs(self) -> torch.Tensor:
        return torch.arange(self.b, device=self.eng.device)

    def _keep(self, offset: int, h: torch.Tensor) -> None:
        """Append layer-E outputs fed at ``offset`` to the window, dropping what was cached from there on."""
        if self.window is None:
            self.window, self.window_start = h, offset
            return
        keep = offset - self.window_start
        if not 0 <= keep <= self.window.shape[0]:
            raise RuntimeError(f"speculative window holds positions [{self.window_start}, "
                               f"{self.window_start + self.window.shape[0]}) but a step fed position {offset}")
        self.window = torch.cat([self.window[:keep], h])

    def _ban(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """``prevent_newline_after_colon``: no newline right after a token ending with ':'."""
        if self.newline_ban is None:
            return x
        newline, colons = self.newline_ban
        x = x.clone()
        x[:, newline] = x[:, newline].masked_fill(colons.to(x.device)[prev], float("-inf"))
        return x
