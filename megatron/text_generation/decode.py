"""Stage 0's decoding loops: token-by-token generation with early exits, and scoring.

Prompts of different lengths share one batch the way Megatron does it ("left-aligned"): the first step
feeds every prompt up to the shortest prompt's length, and each later step feeds one position, which is
still a prompt token for the longer prompts (their sampled token is discarded) and a generated token for
the others. Attention is causal and every sequence occupies its own cache row, so each sequence sees
exactly the tokens it would see alone: the batch gives each prompt's solo output.

Method A's window: ``full`` (F) is the first position whose KV is not yet complete in every layer. Each
step feeds positions ``[F, c)`` at KV offset F; a full-depth pass moves F to c, a pass where every
sequence exited leaves it, so the next step re-feeds those positions and back-fills the skipped layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .early_exit import Carry
from .engine import MODE_GEN, MODE_SCORE, RUN, Header

__all__ = ["Decoded", "prompt_matrix", "decode_loop", "score_loop"]


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


def decode_loop(runner, prompts: list[list[int]], sampling, *, stop_ids: set[int], stop_check=None,
                recompute_cap: int | None = None) -> Decoded:
    """Generate up to ``sampling.tokens_to_generate`` tokens per prompt on stage 0 (``runner.drive``).
    ``stop_check(i, generated ids) -> bool`` ends sequence ``i`` (stop sequences)."""
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
        carry = Carry.start(~active, tokens[:, c - 1]).pack(runner.carry_hidden)
        report = runner.drive(header, carry, tokens[:, full:c])
        res = Carry.unpack(report[2:])
        tokens[active, c], logprob[active, c], layer[active, c] = res.token[active], res.logprob[active], \
            res.exit_layer[active]
        if report[1] > 0.5:
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
    runner.finish()
    out = Decoded([], [], [])
    for i in range(b):
        lo, hi = int(lengths[i]), min(c, int(end[i]))
        out.tokens.append(tokens[i, lo:hi].tolist())
        out.logprobs.append(logprob[i, lo:hi].tolist())
        out.exit_layers.append(layer[i, lo:hi].tolist())
    return out


def score_loop(runner, prompts: list[list[int]]) -> list[list[float]]:
    """Log-probs of every prompt token after the first, from one full-depth forward (stage 0)."""
    device = runner.eng.device
    width = max(len(p) for p in prompts)
    tokens = prompt_matrix(prompts, width + 1, device)
    targets = tokens[:, 1:].contiguous()
    report = runner.drive(Header(RUN, MODE_SCORE, n=width, offset=0), targets.flatten().double(), tokens[:, :width])
    runner.finish()
    lp = report.view(len(prompts), width).float()
    return [lp[i, : len(p) - 1].tolist() for i, p in enumerate(prompts)]
