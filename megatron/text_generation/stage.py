"""One generation's per-rank state and the work of one step on this pipeline stage.

:class:`StageRunner` owns the KV cache of this rank's layers and the :class:`~.early_exit.TokenPicker`.
Stage 0 calls :meth:`StageRunner.drive` once per step and gets the step's report back; every other stage
calls :meth:`StageRunner.serve`, which follows stage 0's headers until END. Every rank advances its own
KV offset from the header, so all layers of every stage agree on what is cached.

Reports (float64): generation ``[complete, full_depth, carry (4 b)]`` (the carry's decisions only: the
``cosine`` measure's hidden state goes down the pipeline in the payload, never back); scoring the log-probs
of the payload's targets ``[b n]``; beam search the top ``k`` log-probs and ids of every row ``[2 b k]``.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .early_exit import PIPELINE, RECOMPUTE, Carry
from .engine import END, MODE_BEAM, MODE_GEN, MODE_SCORE, RUN, SKIP, Header

__all__ = ["StageRunner"]


class StageRunner:
    def __init__(self, eng, batch: int, max_len: int, method: str = RECOMPUTE, picker=None, beam_k: int = 0):
        self.eng, self.b, self.method, self.picker, self.beam_k = eng, batch, method, picker, beam_k
        self.kv = eng.new_cache(batch, max_len)
        needs_hidden = picker is not None and picker.policy.enabled and picker.policy.needs_hidden
        self.carry_hidden = eng.config.hidden_size if needs_hidden else 0  # Carry.pack's hidden_size
        self.observer = None  # observer(runner, header) after every step on this stage (tests)

    # ------------------------------------------------------------------ sizes
    def payload_len(self, h: Header) -> int:
        gen = Carry.packed_len(self.b, self.carry_hidden)
        return {MODE_GEN: gen, MODE_SCORE: self.b * h.n, MODE_BEAM: self.b}[h.mode]

    def report_len(self, h: Header) -> int:
        return {MODE_GEN: 2 + 4 * self.b, MODE_SCORE: self.b * h.n, MODE_BEAM: 2 * self.b * self.beam_k}[h.mode]

    # ------------------------------------------------------------------ entry points
    def drive(self, header: Header, payload: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Stage 0: run the step here, pass it down, and return the step's report."""
        out_header, out_payload, hidden, report = self.run(header, payload, ids=ids)
        if self.eng.is_last:
            return report
        self.eng.send_down(out_header, out_payload, hidden)
        if report is not None:  # method B: every sequence decided on stage 0 itself
            return report
        size = self.report_len(header)
        if header.mode == MODE_GEN and self.method == PIPELINE:
            for stage in range(1, self.eng.state.pp):
                report = self.eng.recv_report(stage, size)
                if report[0] > 0.5:
                    return report
            raise RuntimeError("no pipeline stage reported the step's tokens")  # the last stage always does
        return self.eng.recv_report(self.eng.state.pp - 1, size)

    def finish(self) -> None:
        """Stage 0: tell the other stages that generation is over."""
        if not self.eng.is_last:
            self.eng.send_down(Header(status=END))

    def serve(self) -> None:
        """Stages > 0: run steps until stage 0 sends END."""
        while True:
            header, payload, hidden = self.eng.recv_down(self.payload_len, self.b)
            if header.status == END:
                self.finish()
                return
            out_header, out_payload, out_hidden, report = self.run(header, payload, hidden=hidden)
            if report is not None:  # report before passing down: stage 0 may start the next token sooner
                self.eng.report(report)
            if not self.eng.is_last:
                self.eng.send_down(out_header, out_payload, out_hidden)

    # ------------------------------------------------------------------ the step
    def run(self, header: Header, payload: torch.Tensor, ids=None, hidden=None):
        """-> (header for the next stage, its payload, hidden for it, report for stage 0 or None)."""
        if header.reorder:
            self._reorder(payload[: self.b].round().long())
        self.kv.sequence_len_offset = header.offset
        if header.mode == MODE_GEN:
            result = self._run_gen(header, payload, ids, hidden)
        else:
            result = self._run_head(header, payload, ids, hidden)
        if self.observer is not None:
            self.observer(self, header)
        return result

    def _run_head(self, header: Header, payload: torch.Tensor, ids, hidden):
        out = self.eng.model.infer(ids, inference_params=self.kv, hidden_states=hidden,
                                   num_last=None if header.mode == MODE_SCORE else 1)
        report = None
        if self.eng.is_last:
            report = self._score(out.logits, payload) if header.mode == MODE_SCORE else self._beam(out.logits)
        return header, payload, out.hidden, report

    def _run_gen(self, header: Header, payload: torch.Tensor, ids, hidden):
        eng, picker = self.eng, self.picker
        carry = Carry.unpack(payload, self.carry_hidden)
        status, out_hidden = header.status, None
        if status == RUN:
            picker.begin(carry, header.step)
            # exits excluded by exit_layers are not consulted (EE-LLM evaluated them all), except under
            # cosine, where the next exit compares with their hidden states
            exits_here = picker.policy.enabled and bool(picker.policy.evaluated & set(eng.stage_exits))
            with_hidden = bool(self.carry_hidden)
            if self.method == RECOMPUTE and not header.force_full:
                decider = picker.decide if exits_here else None
                out = eng.model.infer(ids, inference_params=self.kv, hidden_states=hidden, num_last=1,
                                      exit_decider=decider, exited=carry.exited if decider else None,
                                      exit_hidden=with_hidden)
            else:  # no layer may be skipped (method B, or A's capped window): decide after the chunk ran
                evaluate = exits_here and not bool(carry.exited.all())
                out = eng.model.infer(ids, inference_params=self.kv, hidden_states=hidden, num_last=1,
                                      evaluate_exits=evaluate, exit_hidden=with_hidden)
                for layer in sorted(out.exit_logits):
                    picker.decide(layer, out.exit_logits[layer], out.exit_hidden.get(layer))
            if out.stopped:
                status = SKIP
            elif eng.is_last:
                picker.final(out.logits)
            out_hidden = out.hidden
        out_header = replace(header, status=status)
        complete = bool(carry.exited.all())
        report = None
        if self.method == RECOMPUTE:
            if eng.is_last:
                report = [1.0, float(status == RUN)]
        elif not header.reported:
            if complete or eng.is_last:
                report, out_header.reported = [1.0, 1.0], 1
            elif not eng.is_first:
                report = [0.0, 1.0]  # "continue": stage 0 waits for a later stage
        if report is not None:
            report = torch.cat([torch.tensor(report, dtype=torch.float64, device=eng.device), carry.pack()])
        return out_header, carry.pack(self.carry_hidden), (out_hidden if status == RUN else None), report

    # ------------------------------------------------------------------ heads of the other modes
    def _score(self, logits: torch.Tensor, payload: torch.Tensor) -> torch.Tensor:
        vocab = self.eng.vocab
        targets = payload.round().long().view(self.b, -1)
        lp = torch.log_softmax(logits[..., :vocab].float(), dim=-1)
        picked = lp.gather(-1, targets.clamp(max=vocab - 1).unsqueeze(-1)).squeeze(-1)
        picked = picked.masked_fill(targets >= vocab, float("-inf"))
        return picked.flatten().double()

    def _beam(self, logits: torch.Tensor) -> torch.Tensor:
        lp = torch.log_softmax(logits[:, -1, : self.eng.vocab].float(), dim=-1)
        top = torch.topk(lp, self.beam_k, dim=-1)
        return torch.cat([top.values.flatten().double(), top.indices.flatten().double()])

    def _reorder(self, parents: torch.Tensor) -> None:
        """Beam search: row ``i`` of every layer's cache becomes the old row ``parents[i]``."""
        for k_buf, v_buf in self.kv.key_value_memory_dict.values():
            k_buf[: self.b] = k_buf[parents].clone()
            v_buf[: self.b] = v_buf[parents].clone()
