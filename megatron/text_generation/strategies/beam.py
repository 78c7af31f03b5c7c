"""Beam search (stage 0's loop; every stage runs the full depth, early exit does not apply).

Each step the last stage reports every beam's top ``2 W`` next-token log-probs; stage 0 ranks the
``W x 2W`` candidates by cumulative log-prob. A candidate ending in a stop token becomes a finished
hypothesis scored ``sum_logprob / length ** length_penalty`` (length = generated tokens); the best ``W``
others continue, and the next step tells every stage to reorder its KV rows by their parent beams.
Search ends after ``tokens_to_generate`` tokens, or once ``W`` hypotheses are finished and none of the
live beams can beat the worst of them. With ``W = 1`` this is exactly greedy decoding.
"""

from __future__ import annotations

import torch

from ..messages import MODE_BEAM, RUN, BeamReport, Header, Parents
from ..runner import StageRunner, Step

__all__ = ["BeamRunner", "beam_loop"]


class BeamRunner(StageRunner):
    """``batch`` = the beam width ``W``; the last stage reports each row's top ``beam_k`` next tokens."""

    def __init__(self, eng, width: int, max_len: int, beam_k: int):
        super().__init__(eng, width, max_len)
        self.beam_k = beam_k

    def payload_len(self, header: Header) -> int:
        return Parents.size(self.b)

    def read_payload(self, header: Header, t: torch.Tensor) -> Parents:
        return Parents.unpack(t)

    def report_len(self, header: Header) -> int:
        return BeamReport.size(self.b, self.beam_k)

    def read_report(self, header: Header, t: torch.Tensor) -> BeamReport:
        return BeamReport.unpack(t, self.b)

    def step(self, header: Header, payload: Parents, ids=None, hidden=None) -> Step:
        if header.reorder:
            self._reorder(payload.ids)
        out = self.eng.model.infer(ids, inference_params=self.kv, hidden_states=hidden, num_last=1)
        report = None
        if self.eng.is_last:
            top = torch.topk(torch.log_softmax(out.final.logits(), dim=-1), self.beam_k, dim=-1)
            report = BeamReport(top.values.double(), top.indices)
        return Step(header, payload, out.hidden, report)

    def _reorder(self, parents: torch.Tensor) -> None:
        """Row ``i`` of every layer's cache becomes the old row ``parents[i]``."""
        for k_buf, v_buf in self.kv.key_value_memory_dict.values():
            k_buf[: self.b] = k_buf[parents].clone()
            v_buf[: self.b] = v_buf[parents].clone()


class _Hypotheses:
    def __init__(self, width: int, length_penalty: float):
        self.width, self.penalty, self.items = width, length_penalty, []

    def score(self, logprob: float, length: int) -> float:
        return logprob / max(length, 1) ** self.penalty

    def add(self, tokens: list[int], logprob: float) -> None:
        self.items.append((self.score(logprob, len(tokens)), tokens))
        self.items.sort(key=lambda item: -item[0])
        del self.items[self.width:]

    def done(self, best_live: float, length: int) -> bool:
        return len(self.items) >= self.width and self.items[-1][0] >= self.score(best_live, length)


def beam_loop(runner, prompt: list[int], sampling, stop_ids: set[int]) -> tuple[list[list[int]], list[float]]:
    """-> (the ``W`` best generations, best first; their scores)."""
    eng, width = runner.eng, runner.b
    device = eng.device
    ids = torch.tensor([prompt] * width, dtype=torch.long, device=device)
    header = Header(RUN, MODE_BEAM, n=len(prompt), offset=0)
    report = runner.drive(header, Parents(torch.zeros(width, dtype=torch.long, device=device)), ids)
    beams: list[list[int]] = [[] for _ in range(width)]
    scores = torch.full((width,), float("-inf"), dtype=torch.float64, device=device)
    scores[0] = 0.0  # every row holds the same prompt: expand from one of them only
    finished = _Hypotheses(width, sampling.length_penalty)
    k = runner.beam_k
    for step in range(sampling.tokens_to_generate):
        values, indices = report.values, report.indices
        cand = (scores.unsqueeze(1) + values).flatten()
        order = torch.argsort(cand, descending=True, stable=True)
        parents, new_beams, new_scores = [], [], []
        for rank, flat in enumerate(order.tolist()):
            row, tok, s = flat // k, int(indices.flatten()[flat]), float(cand[flat])
            if s == float("-inf"):
                break
            if tok in stop_ids:
                if rank < width:
                    finished.add(beams[row] + [tok], s)
                continue
            parents.append(row)
            new_beams.append(beams[row] + [tok])
            new_scores.append(s)
            if len(parents) == width:
                break
        if not parents or finished.done(max(new_scores), step + 1):
            break
        beams, scores = new_beams, torch.tensor(new_scores, dtype=torch.float64, device=device)
        if step + 1 == sampling.tokens_to_generate or len(parents) < width:
            break
        header = Header(RUN, MODE_BEAM, n=1, offset=len(prompt) + step, reorder=1)
        last = torch.tensor([b[-1] for b in beams], dtype=torch.long, device=device).unsqueeze(1)
        report = runner.drive(header, Parents(torch.tensor(parents, device=device)), last)
    runner.finish()
    if len(finished.items) < width:
        for beam, s in zip(beams, scores.tolist()):
            finished.add(beam, s)
    return [tokens for _, tokens in finished.items], [s for s, _ in finished.items]
