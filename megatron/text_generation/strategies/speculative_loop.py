"""Stage 0's loop of self-speculative decoding, the choice of decoding mode, and its statistics.

Decoding modes (``EarlyExitParams.decoding``): ``full`` (every token from the full depth), ``early_exit``
(EE-LLM's threshold exits; ``use_early_exit: true`` is the older spelling) and ``speculative`` (drafts
from exit ``draft_exit_layer``, default the model's first exit, ``num_speculative_tokens`` at a time,
verified by the full model: greedy output equals ``full``'s, sampled output follows its distribution).

The batch moves in lock-step (see ``acceptance.py``): one KV offset for every sequence, each round
commits ``m + 1`` positions, ``m`` the shortest accepted prefix in the batch. Prompts of different
lengths share the batch as in ``token_by_token.py``: positions still inside a longer prompt are fed its own
tokens and count as accepted. Per generated token, ``exit_layers`` reports ``draft_exit_layer`` for an
accepted draft and the full depth for a token the full model chose itself (a correction or the bonus
token after a fully accepted round): the colour a user sees tells where the exit already agreed.
"""

from __future__ import annotations

import torch

from ..messages import MODE_DRAFT, MODE_VERIFY, RUN, Fed, Header, VerdictReport, VerifyPayload
from ..request import DECODING_MODES, MAX_SPECULATIVE_TOKENS
from .token_by_token import Decoded, prompt_matrix

__all__ = ["resolve_decoding", "draft_exit", "speculative_loop"]


def resolve_decoding(ee_params) -> str:
    """The request's decoding mode; ``use_early_exit`` (the older flag) means ``early_exit``."""
    mode = ee_params.decoding
    if mode not in DECODING_MODES:
        raise ValueError(f"decoding must be one of {', '.join(DECODING_MODES)}, got {mode!r}")
    if mode == "speculative" and ee_params.use_early_exit:
        raise ValueError("decoding 'speculative' cannot be combined with use_early_exit: drop use_early_exit "
                         "(speculative decoding verifies every token with the full model)")
    return "early_exit" if ee_params.use_early_exit else mode


def draft_exit(ee_params, exits: list[int], num_layers: int) -> int:
    """The draft exit of a speculative request, checked: ``draft_exit_layer`` or the first exit."""
    if not exits:
        raise ValueError("decoding 'speculative' needs a model with exits (--exit-layer-nums); use 'full'")
    layer = exits[0] if ee_params.draft_exit_layer is None else ee_params.draft_exit_layer
    if layer not in exits:
        raise ValueError(f"draft_exit_layer {layer} is not an exit of this model (exits: {exits})")
    if layer >= num_layers:
        raise ValueError(f"draft_exit_layer {layer} is the full depth: drafting there saves nothing; pick an "
                         f"exit below layer {num_layers}")
    k = ee_params.num_speculative_tokens
    if not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise ValueError(f"num_speculative_tokens must lie in [1, {MAX_SPECULATIVE_TOKENS}], got {k}")
    return layer


class _Batch:
    """Stage 0's view of the sequences: token matrix, per-position log-probs and exit layers, ends."""

    def __init__(self, prompts: list[list[int]], budget: int, device):
        self.lengths = torch.tensor([len(p) for p in prompts], device=device)
        self.min_len = int(self.lengths.min())
        self.total = int(self.lengths.max()) + budget
        self.tokens = prompt_matrix(prompts, self.total + 1, device)  # + 1: a round's bonus may land there
        self.logprob = torch.zeros(self.tokens.shape, device=device)
        self.layer = torch.zeros(self.tokens.shape, dtype=torch.long, device=device)
        self.end = self.lengths + budget  # one past each sequence's last position
        self.done = torch.zeros(len(prompts), dtype=torch.bool, device=device)

    def free(self, c: int, k: int) -> torch.Tensor:
        """``[b, k]``: positions ``c .. c + k - 1`` whose token the model chooses (not a prompt token, not
        past the sequence's end)."""
        pos = torch.arange(c, c + k, device=self.lengths.device).unsqueeze(0)
        return (self.lengths.unsqueeze(1) <= pos) & (pos < self.end.unsqueeze(1)) & ~self.done.unsqueeze(1)

    def pending(self, c: int) -> bool:
        return bool((~self.done & (c < self.end)).any())


def _draft(runner, batch: _Batch, first: int, c: int, k: int) -> None:
    """Draft positions ``c .. c + k - 1`` (the first step also feeds ``[first, c)``)."""
    for i in range(k):
        lo = first if i == 0 else c + i - 1
        header = Header(RUN, MODE_DRAFT, n=c + i - lo, offset=lo, step=c + i - batch.min_len)
        drafts = runner.drive(header, Fed(batch.tokens[:, c + i - 1]), batch.tokens[:, lo: c + i])
        generated = batch.lengths <= c + i
        batch.tokens[:, c + i] = torch.where(generated, drafts.ids, batch.tokens[:, c + i])


def _commit(batch: _Batch, verdict: VerdictReport, c: int, exit_layer: int, num_layers: int) -> torch.Tensor:
    """Write the verdict's positions ``c .. c + m`` into the batch; -> from_draft ``[b, m + 1]``."""
    m = verdict.accepted
    cols = slice(c, c + m + 1)
    pos = torch.arange(c, c + m + 1, device=verdict.tokens.device).unsqueeze(0)
    generated = batch.lengths.unsqueeze(1) <= pos
    batch.tokens[:, cols] = torch.where(generated, verdict.tokens[:, : m + 1], batch.tokens[:, cols])
    batch.logprob[:, cols] = verdict.logprobs[:, : m + 1]
    kept = verdict.from_draft[:, : m + 1]
    batch.layer[:, cols] = torch.where(kept, exit_layer, num_layers).to(batch.layer.dtype)
    return kept


def _stops(batch: _Batch, c: int, m: int, stops: torch.Tensor, stop_check) -> None:
    """End the sequences whose stop token, stop sequence or budget falls at positions ``c .. c + m``."""
    for pos in range(c, c + m + 1):
        live = (batch.lengths <= pos) & (pos < batch.end) & ~batch.done
        hit = live & torch.isin(batch.tokens[:, pos], stops)
        if stop_check is not None:
            for i in live.nonzero().flatten().tolist():
                if not hit[i] and stop_check(i, batch.tokens[i, int(batch.lengths[i]): pos + 1].tolist()):
                    hit[i] = True
        batch.end = torch.where(hit, torch.full_like(batch.end, pos + 1), batch.end)
        batch.done |= hit | (live & (pos + 1 >= batch.end))


def _emit(emit, batch: _Batch, live: torch.Tensor, c: int, m: int) -> None:
    """Each live sequence's tokens committed at positions ``c .. c + m`` (its generated, unstopped ones)."""
    for i in live.nonzero().flatten().tolist():
        lo, hi = max(c, int(batch.lengths[i])), min(c + m + 1, int(batch.end[i]))
        if lo < hi:
            emit(i, batch.tokens[i, lo:hi].tolist(), batch.layer[i, lo:hi].tolist(), batch.logprob[i, lo:hi].tolist())


def speculative_loop(runner, prompts: list[list[int]], sampling, *, stop_ids: set[int], stop_check=None,
                     k: int, num_layers: int, emit=None) -> Decoded:
    """Generate up to ``sampling.tokens_to_generate`` tokens per prompt on stage 0 by rounds of ``k``
    drafts and one verification; ``extra["speculative"]`` holds the round statistics. ``emit(i, tokens,
    exit_layers, logprobs)`` receives each round's committed tokens of sequence ``i`` (streaming)."""
    device = runner.eng.device
    batch = _Batch(prompts, sampling.tokens_to_generate, device)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    first, c = 0, batch.min_len
    rounds = drafted = accepted = 0
    while c < batch.total and batch.pending(c):
        kr = min(k, batch.total - c)
        free = batch.free(c, kr)
        _draft(runner, batch, first, c, kr)
        header = Header(RUN, MODE_VERIFY, n=c + kr - first, offset=first, step=c - batch.min_len, draft=kr)
        payload = VerifyPayload(batch.tokens[:, c - 1: c + kr], free)
        verdict = runner.drive(header, payload, batch.tokens[:, c + kr - 1: c + kr])
        m = verdict.accepted
        kept = _commit(batch, verdict, c, runner.exit, num_layers)
        rounds += 1
        drafted += int(free.sum())
        accepted += int((kept[:, :kr] & free[:, : m + 1]).sum())
        live = (batch.lengths <= c + m) & ~batch.done
        _stops(batch, c, m, stops, stop_check)
        if emit is not None:
            _emit(emit, batch, live, c, m)
        first, c = c + m, c + m + 1
    runner.finish()
    out = Decoded([], [], [])
    for i in range(len(prompts)):
        lo, hi = int(batch.lengths[i]), min(c, int(batch.end[i]))
        out.tokens.append(batch.tokens[i, lo:hi].tolist())
        out.logprobs.append(batch.logprob[i, lo:hi].tolist())
        out.exit_layers.append(batch.layer[i, lo:hi].tolist())
    out.extra["speculative"] = {
        "draft_exit_layer": runner.exit, "num_speculative_tokens": k, "rounds": rounds, "drafted": drafted,
        "accepted": accepted, "acceptance_rate": accepted / drafted if drafted else 0.0,
    }
    return out
