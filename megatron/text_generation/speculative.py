"""Self-speculative decoding on one pipeline stage: drafting with an exit, verifying with the full model.

A round (driven by stage 0, see ``speculative_decode.py``) is ``k`` draft steps and one verify step.
Let ``F`` be the first position whose KV is not complete in every layer and ``c`` the next position to
predict (the token at ``c - 1`` is known but not yet fed past the draft exit ``E``):

- draft step ``i`` (:data:`MODE_DRAFT`) feeds positions ``[F, c)`` (``i = 0``) or ``c + i - 1`` through
  layers ``1..E`` only, on the stages up to E's; E's stage keeps the layer-``E`` output of every fed
  position (the *window*), and draws draft ``i`` from exit ``E``'s head (reported to stage 0);
- the verify step (:data:`MODE_VERIFY`) feeds the last draft through layers ``1..E`` (the stages up to
  E's), then layers ``E+1..L`` run ONCE over the whole window ``[F, c + k)`` at KV offset ``F``: layers
  ``<= E`` are never recomputed (the KV the drafts wrote there is exactly what a full forward writes);
  the last stage takes the full model's logits of positions ``c - 1 .. c + k - 1`` and applies the
  acceptance rule (``acceptance.py``); its verdict goes to stage 0.

Rejected positions are rolled back by the offsets alone: the next round starts at ``F' = c + m`` and
overwrites every cached position from there on before anything reads it. Under sampling E's stage keeps
each draft's distribution ``q`` and, when it is not the last stage, sends them straight to the last
stage after passing the verify step down. Exit blocks of exits ``<= E`` get their KV during drafts, the
others during verification, so every layer's cache ends as a full-depth decode's would.
"""

from __future__ import annotations

import torch

from megatron.model.exit_heads import EarlyExitTransformerLayer, full_vocab_logits, lm_logits

from .acceptance import verify_greedy, verify_sampled
from .engine import END, MODE_DRAFT, MODE_VERIFY, Header
from .sampling import is_greedy, sampling_probs, token_logprobs

__all__ = ["SpeculativeRunner"]


class SpeculativeRunner:
    """One speculative generation's per-rank state: the KV cache of this rank's layers, the window of
    layer-``E`` outputs and the round's draft distributions (E's stage), and the token rules."""

    def __init__(self, eng, batch: int, max_len: int, draft_exit: int, sampling, generator, newline_ban=None):
        self.eng, self.b, self.exit, self.sampling, self.generator = eng, batch, draft_exit, sampling, generator
        self.newline_ban = newline_ban  # (newline id, set of ids ending with ':') or None
        self.kv = eng.new_cache(batch, max_len)
        self.exit_stage = eng.model.partition.owner(draft_exit).stage
        self.sampled = not is_greedy(sampling)
        self.window: torch.Tensor | None = None  # layer-E outputs of positions [window_start, ...)
        self.window_start = 0
        self.q: list[torch.Tensor] = []  # this round's draft distributions [b, V] (sampling, E's stage)
        self.observer = None  # observer(runner, header) after every step on this stage (tests)

    # ------------------------------------------------------------------ message sizes
    def payload_len(self, h: Header) -> int:
        """Draft: the tokens fed last ``[b]``; verify: the fed tokens ``[b, k + 1]`` and ``free`` ``[b, k]``."""
        return self.b if h.mode == MODE_DRAFT else self.b * (2 * h.draft + 1)

    def report_len(self, h: Header) -> int:
        return self.b if h.mode == MODE_DRAFT else 1 + 3 * self.b * (h.draft + 1)

    def hidden_len(self, h: Header) -> int:
        """Positions this stage receives: a verify step carries only the last draft up to E's stage."""
        return 1 if h.mode == MODE_VERIFY and self.eng.stage - 1 < self.exit_stage else h.n

    def _ends_here(self, h: Header) -> bool:
        return self.eng.is_last or (h.mode == MODE_DRAFT and self.eng.stage == self.exit_stage)

    def _q_travels(self, h: Header) -> bool:
        return h.mode == MODE_VERIFY and self.sampled and self.exit_stage != self.eng.state.pp - 1

    # ------------------------------------------------------------------ entry points
    def drive(self, header: Header, payload: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Stage 0: run the step here, pass it down when it goes further, and return its report."""
        hidden, report = self.run(header, payload, ids=ids)
        if self._ends_here(header):
            return report
        self.eng.send_down(header, payload, hidden)
        self._send_q(header)
        source = self.exit_stage if header.mode == MODE_DRAFT else self.eng.state.pp - 1
        return self.eng.recv_report(source, self.report_len(header))

    def finish(self) -> None:
        """Tell the next stage that generation is over (stage 0 starts it, every stage passes it on)."""
        if not self.eng.is_last:
            self.eng.send_down(Header(status=END))

    def serve(self) -> None:
        """Stages > 0: run the steps that reach this stage until stage 0 sends END."""
        while True:
            header, payload, hidden = self.eng.recv_down(self.payload_len, self.b, self.hidden_len)
            if header.status == END:
                self.finish()
                return
            if self.eng.is_last and self._q_travels(header):
                (q,) = self.eng.p2p.exchange(recvs=[((header.draft, self.b, self.eng.vocab), torch.float32,
                                                      self.exit_stage)])
                self.q = list(q.unbind(0))
            out, report = self.run(header, payload, hidden=hidden)
            if self._ends_here(header):
                self.eng.report(report)
            else:
                self.eng.send_down(header, payload, out)
                self._send_q(header)

    def _send_q(self, header: Header) -> None:
        if self._q_travels(header) and self.eng.stage == self.exit_stage:
            self.eng.p2p.exchange(sends=[(torch.stack(self.q), self.eng.state.pp - 1)])
            self.q = []

    # ------------------------------------------------------------------ the steps
    def run(self, header: Header, payload: torch.Tensor, ids=None, hidden=None):
        """-> (hidden for the next stage or None, report for stage 0 or None)."""
        with torch.no_grad():
            if header.mode == MODE_DRAFT:
                result = self._draft(header, payload, ids, hidden)
            else:
                result = self._verify(header, payload, ids, hidden)
        if self.observer is not None:
            self.observer(self, header)
        return result

    def _draft(self, header: Header, payload: torch.Tensor, ids, hidden):
        h = self._input(ids, hidden, header.offset)
        if self.eng.stage < self.exit_stage:
            return self._layers(h, header.offset)[0], None
        h, h_exit = self._layers(h, header.offset, hi=self.exit)
        self._keep(header.offset, h)
        weight = self.eng.model.exit_weight(self.exit)
        x = self._logits(h_exit[-1:], weight)[:, -1]
        x = self._ban(x, payload.round().long())
        if self.sampled:
            q = sampling_probs(x, self.sampling, header.step)
            self.q.append(q)
            drafts = torch.multinomial(q, 1, generator=self.generator).squeeze(-1)
        else:
            drafts = x.argmax(dim=-1)
        return None, drafts.double()

    def _verify(self, header: Header, payload: torch.Tensor, ids, hidden):
        start, k = header.offset, header.draft
        fresh_at = start + header.n - 1  # the last draft: not yet through layers 1..E
        stage = self.eng.stage
        if stage <= self.exit_stage:
            h = self._input(ids, hidden, fresh_at)
            if stage < self.exit_stage:
                return self._layers(h, fresh_at)[0], None
            h, _ = self._layers(h, fresh_at, hi=self.exit)
            self._keep(fresh_at, h)
            h = self.window[start - self.window_start:]
            self.window, self.window_start = h, start  # positions before F are complete: drop them
            h, _ = self._layers(h, start, lo=self.exit)
        else:
            h, _ = self._layers(hidden, start)
        if not self.eng.is_last:
            return h, None
        return None, self._judge(h[-(k + 1):], payload, header)

    def _judge(self, h: torch.Tensor, payload: torch.Tensor, header: Header) -> torch.Tensor:
        """The last stage: the full model's verdict on the drafts -> report ``[m, tokens, log-probs,
        from_draft]`` (each ``[b, k + 1]``)."""
        k, b = header.draft, self.b
        fed, free = payload.round().long()[: b * (k + 1)].view(b, k + 1), payload[b * (k + 1):].view(b, k) > 0.5
        x = self._logits(h, self.eng.model.output_weight())
        x = torch.stack([self._ban(x[:, i], fed[:, i]) for i in range(k + 1)], dim=1)
        drafts = fed[:, 1:]
        if self.sampled:
            p = torch.stack([sampling_probs(x[:, i], self.sampling, header.step + i) for i in range(k + 1)], dim=1)
            verdict = verify_sampled(p, torch.stack(self.q, dim=1), drafts, free, self.generator)
        else:
            verdict = verify_greedy(x, drafts, free)
        self.q = []
        logprobs = token_logprobs(x, verdict.tokens)
        m = torch.tensor([float(verdict.accepted)], dtype=torch.float64, device=x.device)
        return torch.cat([m, verdict.tokens.double().flatten(), logprobs.double().flatten(),
                          verdict.from_draft.double().flatten()])

    # ------------------------------------------------------------------ the model, layer by layer
    def _input(self, ids, hidden, offset: int) -> torch.Tensor:
        model = self.eng.model
        if model.spec.has_embedding:
            return model.stage_input(ids, None, None, offset=offset)[0]
        return hidden

    def _layers(self, h: torch.Tensor, offset: int, lo: int = 0, hi: int | None = None):
        """Run this chunk's layers numbered ``lo < l <= hi`` on ``h`` ``[n, b, h]`` fed at KV ``offset``
        (the final norm too when the range ends at this chunk's head). -> (output, exit E's hidden or None)."""
        model = self.eng.model
        hi = model.config.num_layers if hi is None else hi
        self.kv.sequence_len_offset = offset
        rope = self._rope(offset, h)
        h_exit = None
        for layer in model.language_model.encoder.layers:
            if not lo < layer.layer_number <= hi:
                continue
            if isinstance(layer, EarlyExitTransformerLayer):
                h, out_exit = layer(h, None, rope, self.kv)
                if layer.layer_number == self.exit:
                    h_exit = out_exit
            else:
                h = layer(h, None, rope, self.kv)
        norm = model.language_model.encoder.final_norm
        if norm is not None and hi == model.config.num_layers:
            h = norm(h)
        return h, h_exit

    def _rope(self, offset: int, h: torch.Tensor):
        rotary = self.eng.model.rotary
        if rotary is None:
            return None
        n, b = h.shape[0], h.shape[1]
        positions = torch.arange(offset, offset + n, device=h.device).unsqueeze(0).expand(b, n)
        return rotary.cos_sin(positions, dtype=h.dtype)

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

    def _logits(self, h: torch.Tensor, weight) -> torch.Tensor:
        """``h`` ``[n, b, h]`` -> logits ``[b, n, V]`` over the real vocabulary."""
        group = self.eng.state.tp_group
        return full_vocab_logits(lm_logits(h, weight, group, False), group)[..., : self.eng.vocab].float()

    def _ban(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """``prevent_newline_after_colon``: no newline right after a token ending with ':'."""
        if self.newline_ban is None:
            return x
        newline, colons = self.newline_ban
        after_colon = torch.tensor([int(t) in colons for t in prev], dtype=torch.bool, device=x.device)
        x = x.clone()
        x[after_colon, newline] = float("-inf")
        return x
