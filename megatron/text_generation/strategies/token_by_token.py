"""Token-by-token decoding with early exits: the stage's step (:class:`TokenRunner`) and stage 0's loop.

Prompts of different lengths share one batch the way Megatron does it ("left-aligned"): the first step
feeds every prompt up to the shortest prompt's length, and each later step feeds one position, which is
still a prompt token for the longer prompts (their sampled token is discarded) and a generated token for
the others. Attention is causal and every sequence occupies its own cache row, so each sequence sees
exactly the tokens it would see alone: the batch gives each prompt's solo output.

Method A's window: ``full`` (F) is the first position whose KV is not yet complete in every layer. Each
step feeds positions ``[F, c)`` at KV offset F; a full-depth pass moves F to c, a pass where every
sequence exited leaves it, so the next step re-feeds those positions and back-fills the skipped layers.
``recompute_cap`` bounds the window (see ``early_exit.py``).

Reports (``messages.GenReport``): the carry's decisions only (the ``cosine`` measure's hidden state goes
down the pipeline in the payload, never back).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..messages import MODE_GEN, RUN, SKIP, Carry, GenReport, Header
from ..runner import StageRunner, Step
from .early_exit import PIPELINE, RECOMPUTE

__all__ = ["Decoded", "prompt_matrix", "TokenRunner", "decode_loop"]


@dataclass
class Decoded:
    """Per sequence: generated ids, their log-probs and exit layers; prompt log-probs when scored."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    exit_layers: list[list[int]]
    prompt_logprobs: list[list[float]] | None = None
    extra: dict = field(default_factory=dict)


def prompt_matrix(prompts: list[list[int]], width: int, device) -> torch.Tensor:
    """``[b, width]`` long: each prompt left-aligned in its row, zeros after it."""
    tokens = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    return tokens


class TokenRunner(StageRunner):
    """One token-by-token generation on this rank: the KV cache and the :class:`~.early_exit.TokenPicker`
    (``picker.rule`` None: full depth, no exit is computed)."""

    def __init__(self, eng, batch: int, max_len: int, method: str, picker):
        super().__init__(eng, batch, max_len)
        self.method, self.picker = method, picker
        rule = picker.rule
        # exits excluded by exit_layers are not computed at all (EE-LLM ran their blocks and heads), except
        # those a comparing measure (cosine) reads the hidden state of
        self.exits_here = sorted(rule.computed & set(eng.stage_exits)) if rule is not None else []
        compares = rule is not None and rule.measure.compares
        self.carry_hidden = eng.config.hidden_size if compares else 0  # Carry.pack's hidden_size

    def payload_len(self, header: Header) -> int:
        return Carry.packed_len(self.b, self.carry_hidden)

    def read_payload(self, header: Header, t: torch.Tensor) -> Carry:
        return Carry.unpack(t, self.carry_hidden)

    def report_len(self, header: Header) -> int:
        return GenReport.size(self.b)

    def read_report(self, header: Header, t: torch.Tensor) -> GenReport:
        return GenReport.unpack(t)

    def reports_here(self, header: Header) -> bool:
        return self.eng.is_last if self.method == RECOMPUTE else not header.reported

    def report_sources(self, header: Header) -> list[int]:
        # method B: stage 0 hears "continue" from each stage until the one where every sequence decided
        pp = self.eng.state.pp
        return list(range(1, pp)) if self.method == PIPELINE else [pp - 1]

    def completes(self, header: Header, report: GenReport) -> bool:
        return report.complete

    def step(self, header: Header, carry: Carry, ids=None, hidden=None) -> Step:
        eng, picker = self.eng, self.picker
        status, out_hidden = header.status, None
        if status == RUN:
            picker.begin(carry, header.step)
            out = eng.model.infer(ids, inference_params=self.kv, hidden_states=hidden, num_last=1,
                                  exits=self.exits_here, decider=picker.decide if self.exits_here else None,
                                  stop_when_decided=self.method == RECOMPUTE and not header.force_full,
                                  exited=carry.exited)
            if out.stopped:
                status = SKIP
            elif eng.is_last:
                picker.final(out.final)
            out_hidden = out.hidden
        out_header = replace(header, status=status)
        report = None
        if self.method == RECOMPUTE:
            if eng.is_last:
                report = GenReport(True, status == RUN, carry)
        elif not header.reported:
            if eng.is_last or bool(carry.exited.all()):
                report, out_header.reported = GenReport(True, True, carry), 1
            elif not eng.is_first:
                report = GenReport(False, True, carry)  # "continue": stage 0 waits for a later stage
        return Step(out_header, carry, out_hidden if status == RUN else None, report)


def decode_loop(runner: TokenRunner, prompts: list[list[int]], sampling, *, stop_ids: set[int], stop_check=None,
                recompute_cap: int | None = None, emit=None) -> Decoded:
    """Generate up to ``sampling.tokens_to_generate`` tokens per prompt on stage 0 (``runner.drive``).
    ``stop_check(i, generated ids) -> bool`` ends sequence ``i`` (stop sequences); ``emit(i, tokens,
    exit_layers, logprobs)`` is called with each token as soon as it is decided (streaming)."""
    device = runner.eng.device
    b, budget = len(prompts), sampling.tokens_to_generate
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    total = int(lengths.max()) + budget
    tokens = prompt_matrix(prompts, total, device)
    logprob = torch.zeros(b, total, device=device)
    layer = torch.zeros(b, total, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    end = lengths + budget  # one past each sequence's last generated position
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    full, c, consecutive = 0, int(lengths.min()), 0
    while c < total:
        active = (lengths <= c) & (c < lengths + budget) & ~done
        if not bool(active.any()) and c >= int(lengths.max()):
            break
        force = recompute_cap is not None and consecutive >= recompute_cap
        step = c - int(lengths.min())
        header = Header(RUN, MODE_GEN, n=c - full, offset=full, step=step, force_full=int(force))
        report = runner.drive(header, Carry.start(~active, tokens[:, c - 1], runner.carry_hidden), tokens[:, full:c])
        res = report.carry
        tokens[:, c] = torch.where(active, res.token, tokens[:, c])
        logprob[:, c] = torch.where(active, res.logprob, logprob[:, c])
        layer[:, c] = torch.where(active, res.exit_layer, layer[:, c])
        if report.full_depth:
            full, consecutive = c, 0
        else:
            consecutive += 1
        finished = active & torch.isin(res.token, stops)
        c += 1
        if stop_check is not None:
            for i in active.nonzero().flatten().tolist():
                if stop_check(i, tokens[i, int(lengths[i]): c].tolist()):
                    finished[i] = True
        end = torch.where(finished, torch.full_like(end, c), end)
        done |= finished
        if emit is not None:
            for i in active.nonzero().flatten().tolist():
                emit(i, [int(tokens[i, c - 1])], [int(layer[i, c - 1])], [float(logprob[i, c - 1])])
    runner.finish()
    out = Decoded([], [], [])
    for i in range(b):
        lo, hi = int(lengths[i]), min(c, int(end[i]))
        out.tokens.append(tokens[i, lo:hi].tolist())
        out.logprobs.append(logprob[i, lo:hi].tolist())
        out.exit_layers.append(layer[i, lo:hi].tolist())
    return out
