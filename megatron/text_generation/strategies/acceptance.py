"""The verification rule of speculative decoding: which drafted tokens the full model accepts, and the
token that follows them.

One verify step checks ``k`` drafted positions of a batch. For each sequence the full model's
distributions ``p_0 .. p_k`` (``p_i`` predicts drafted position ``i``; ``p_k`` the position after the
last draft) are compared with the drafts:

- greedy: draft ``i`` is accepted when it is the full model's argmax;
- sampling (Leviathan et al. 2023, Chen et al. 2023): draft ``d ~ q_i`` is accepted with probability
  ``min(1, p_i(d) / q_i(d))``; the first rejected position takes a token drawn from
  ``norm(max(0, p_i - q_i))``. Each emitted token is then distributed exactly as ``p_i``.

Positions that are not ``free`` (a longer prompt's own tokens, finished sequences) are accepted as fed.

Batches move in lock-step: every sequence commits the same number of positions, ``m + 1`` where ``m`` is
the smallest accepted-prefix length over the batch, so the KV offset stays one number. A sequence that
accepted more keeps its accepted draft at position ``m`` and drops the rest; a sequence that stopped at
``m`` takes its correction there (or, when ``m = k``, a "bonus" token drawn from ``p_k``). This stays
lossless: which position the batch stops at depends on the other sequences' independent draws only,
and every committed token is either an accepted draft or a correction, both distributed as ``p``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sampling import draw_from

__all__ = ["Verdict", "verify_greedy", "verify_sampled"]


@dataclass
class Verdict:
    """``accepted`` (``m``): drafted positions every sequence commits before its last committed token;
    the batch commits positions ``0 .. m``. ``tokens`` ``[b, k + 1]``: the committed token of each
    position (valid up to ``m``). ``from_draft`` ``[b, k + 1]``: the token is the fed (drafted or forced)
    one, not a correction or bonus token."""

    accepted: int
    tokens: torch.Tensor
    from_draft: torch.Tensor


def _commit(ok: torch.Tensor, drafts: torch.Tensor, correction) -> Verdict:
    """``ok`` ``[b, k]``: per position, accepted (or forced). ``correction(rows, m)`` -> the tokens of
    ``rows`` (the sequences whose accepted prefix ends at ``m``) at position ``m``."""
    b, k = ok.shape
    prefix = torch.cumprod(ok.long(), dim=1).sum(dim=1)  # per sequence: length of the accepted prefix
    m = int(prefix.min()) if b else k
    tokens = torch.cat([drafts, torch.zeros(b, 1, dtype=drafts.dtype, device=drafts.device)], dim=1)
    from_draft = torch.arange(k + 1, device=ok.device).unsqueeze(0) < prefix.unsqueeze(1)
    rows = prefix == m
    if bool(rows.any()):
        tokens[rows, m] = correction(rows, m)
    return Verdict(m, tokens, from_draft)


def verify_greedy(logits: torch.Tensor, drafts: torch.Tensor, free: torch.Tensor) -> Verdict:
    """``logits`` ``[b, k + 1, V]`` of the full model, ``drafts`` ``[b, k]``, ``free`` ``[b, k]`` (bool)."""
    target = logits.argmax(dim=-1)
    ok = ~free | (drafts == target[:, :-1])
    return _commit(ok, drafts, lambda rows, m: target[rows, m])


def verify_sampled(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, free: torch.Tensor, accept: torch.Tensor,
                   residual: torch.Tensor) -> Verdict:
    """``p`` ``[b, k + 1, V]``: the full model's sampling distributions; ``q`` ``[b, k, V]``: the ones the
    drafts were drawn from (same temperature / top-k / top-p); ``drafts``, ``free`` ``[b, k]``. The random
    numbers are given (a pure function, see ``sampling.Draws``): ``accept`` ``[b, k]`` uniforms for the
    acceptance tests, ``residual`` ``[b, k + 1]`` for the token drawn where a sequence's accepted prefix
    ends (a correction, or the bonus token after ``k`` accepted drafts)."""
    b, k = drafts.shape
    p_d = p[:, :k].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    q_d = q.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    # u < p/q without dividing by q (q(d) > 0: d was drawn from q)
    ok = ~free | (accept.double() * q_d.double() < p_d.double())

    def correction(rows: torch.Tensor, m: int) -> torch.Tensor:
        dist = p[rows, m]
        if m < k:
            excess = (dist - q[rows, m]).clamp(min=0.0)
            mass = excess.sum(dim=-1, keepdim=True)
            # a rejection implies p(d) < q(d), so p != q and the residual has mass; rounding aside
            dist = torch.where(mass > 0, excess / mass.clamp(min=1e-30), dist)
        return draw_from(dist, residual[rows, m])

    return _commit(ok, drafts, correction)
