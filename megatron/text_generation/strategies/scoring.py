"""Scoring (``tokens_to_generate`` 0): the log-prob of every prompt token after the first, from one
full-depth forward of the prompts through the pipeline; the last stage reports them."""

from __future__ import annotations

import torch

from ..messages import MODE_SCORE, RUN, Header, ScoreReport, Targets
from ..runner import StageRunner, Step
from .token_by_token import prompt_matrix

__all__ = ["ScoreRunner", "score_loop"]


class ScoreRunner(StageRunner):
    def payload_len(self, header: Header) -> int:
        return Targets.size(self.b, header.n)

    def read_payload(self, header: Header, t: torch.Tensor) -> Targets:
        return Targets.unpack(t, self.b)

    def report_len(self, header: Header) -> int:
        return ScoreReport.size(self.b, header.n)

    def read_report(self, header: Header, t: torch.Tensor) -> ScoreReport:
        return ScoreReport.unpack(t, self.b)

    def step(self, header: Header, payload: Targets, ids=None, hidden=None) -> Step:
        out = self.eng.model.infer(ids, inference_params=self.kv, hidden_states=hidden)
        report = None
        if self.eng.is_last:
            targets = payload.ids.flatten()
            vocab = self.eng.vocab
            lp = torch.log_softmax(out.final.logits(), dim=-1)
            picked = lp.gather(-1, targets.clamp(max=vocab - 1).unsqueeze(-1)).squeeze(-1)
            picked = picked.masked_fill(targets >= vocab, float("-inf"))
            report = ScoreReport(picked.view(self.b, -1))
        return Step(header, payload, out.hidden, report)


def score_loop(runner: ScoreRunner, prompts: list[list[int]]) -> list[list[float]]:
    """Stage 0: the log-probs of every prompt token after the first."""
    device = runner.eng.device
    width = max(len(p) for p in prompts)
    tokens = prompt_matrix(prompts, width + 1, device)
    targets = Targets(tokens[:, 1:].contiguous())
    report = runner.drive(Header(RUN, MODE_SCORE, n=width, offset=0), targets, tokens[:, :width])
    runner.finish()
    lp = report.logprobs
    return [lp[i, : len(p) - 1].tolist() for i, p in enumerate(prompts)]
