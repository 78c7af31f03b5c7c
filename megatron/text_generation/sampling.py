"""Token selection from logits: greedy, temperature, top-k, top-p (with per-step decay and a lower
bound), log-probs, the check of sampling parameters, and the random numbers sampling draws.

Randomness is a pure function of (seed, stream, sequence, position) (:class:`Draws`): a counter-based
generator (SplitMix64 of the four) gives each sequence of a request, at each position, its own uniform
number per use (``stream``: the token draw, a speculative draft, its acceptance test, the residual draw).
Whichever rank decides a token, on whichever pipeline stage, under whichever tensor-parallel split or
early-exit method, draws the same number, so sampled output does not depend on the parallel layout (a
per-rank generator advanced only where a stage samples did), and CPU and GPU draw the same numbers.
Sampling maps the number through the inverse CDF of the sampling distribution.
"""

from __future__ import annotations

import torch

__all__ = ["check_sampling", "top_p_at", "is_greedy", "sampling_probs", "select_tokens", "token_logprobs", "Draws",
           "SAMPLE", "DRAFT", "ACCEPT", "RESIDUAL", "draw_from"]

SAMPLE, DRAFT, ACCEPT, RESIDUAL = 1, 2, 3, 4  # streams of Draws

_MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    """A 64-bit constant as the int64 value with the same bits (torch's integer arithmetic wraps)."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (``>>`` on int64 is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix(x: torch.Tensor) -> torch.Tensor:
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


class Draws:
    """Uniform numbers in [0, 1) as a pure function of (``seed``, stream, sequence, position)."""

    def __init__(self, seed: int, device=None):
        self.seed, self.device = int(seed) & _MASK64, device

    def uniform(self, stream: int, seqs: torch.Tensor, positions) -> torch.Tensor:
        """``seqs`` ``[m]`` (sequence indices in the request) and ``positions`` (an int or ``[m]``) ->
        ``[m]`` float64."""
        seqs = seqs.to(device=self.device, dtype=torch.long)
        pos = torch.as_tensor(positions, dtype=torch.long, device=seqs.device).expand_as(seqs)
        h = _splitmix(torch.full_like(seqs, _signed(self.seed)))
        for word in (torch.full_like(seqs, stream), seqs, pos):
            h = _splitmix(h ^ word)
        return _shr(h, 11).double() * 2.0 ** -53


def draw_from(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: ``probs`` ``[m, V]`` (rows summing to about 1) and ``u`` ``[m]`` in [0, 1) ->
    ids ``[m]``; a zero-probability token is never drawn."""
    cdf = probs.double().cumsum(dim=-1)
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def check_sampling(params) -> None:
    """Reject inconsistent :class:`~megatron.text_generation.request.SamplingParams`, naming the field."""
    if params.tokens_to_generate < 0:
        raise ValueError(f"tokens_to_generate must be >= 0, got {params.tokens_to_generate}")
    if params.top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {params.top_k}")
    if not 0.0 <= params.top_p <= 1.0:
        raise ValueError(f"top_p must lie in [0, 1] (0 = off), got {params.top_p}")
    if params.top_k > 0 and params.top_p > 0.0:
        raise ValueError("top_k and top_p cannot be combined; set one of them to 0")
    if not 0.0 <= params.top_p_decay <= 1.0 or not 0.0 <= params.top_p_bound <= 1.0:
        raise ValueError("top_p_decay and top_p_bound must lie in [0, 1]")
    if not params.greedy and params.temperature <= 0.0:
        raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {params.temperature}")
    if params.beam_width is not None and params.beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {params.beam_width}")


def top_p_at(params, step: int) -> float:
    """Megatron's schedule: top_p shrinks by ``top_p_decay`` after every generated token, not below
    ``top_p_bound``."""
    p = params.top_p
    if p > 0.0 and params.top_p_decay > 0.0:
        p = p * params.top_p_decay ** step
        if params.top_p_bound > 0.0:
            p = max(p, params.top_p_bound)
    return p


def is_greedy(params) -> bool:
    return params.greedy or params.top_k == 1


def sampling_probs(logits: torch.Tensor, params, step: int) -> torch.Tensor:
    """The distribution sampling draws from: ``logits`` ``[m, V]`` after temperature, top-k and top-p
    (at generation ``step``) -> probabilities ``[m, V]`` (float32). Speculative sampling compares two
    of these, so the draft and the full model go through exactly the same transformation."""
    x = logits.float() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(x, min(params.top_k, x.shape[-1]), dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    p = top_p_at(params, step)
    if p > 0.0:
        x = _nucleus(x, p)
    return torch.softmax(x, dim=-1)


def select_tokens(logits: torch.Tensor, params, step: int, u: torch.Tensor | None) -> torch.Tensor:
    """``logits`` ``[m, V]`` (already restricted to the real vocabulary) -> token ids ``[m]``; ``u`` ``[m]``:
    each row's uniform number (:class:`Draws`; unused when greedy)."""
    if logits.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=logits.device)
    if is_greedy(params):
        return logits.argmax(dim=-1)
    return draw_from(sampling_probs(logits, params, step), u)


def _nucleus(x: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches ``p`` (the top token
    always stays)."""
    sorted_x, order = torch.sort(x, dim=-1, descending=True)
    probs = torch.softmax(sorted_x, dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = before >= p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return x.masked_fill(drop, float("-inf"))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of ``tokens`` ``[...]`` under the untempered ``logits`` ``[..., V]``."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
