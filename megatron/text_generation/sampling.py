"""Token selection from logits: greedy, temperature, top-k, top-p (with per-step decay and a lower
bound), log-probs, and the check of sampling parameters.

Randomness comes only from the ``torch.Generator`` passed in. Generation seeds one generator per rank
with the request's seed, and every tensor-parallel rank of a stage sees the same full-vocabulary logits,
so all of them draw the same tokens without a broadcast.
"""

from __future__ import annotations

import torch

__all__ = ["check_sampling", "top_p_at", "is_greedy", "sampling_probs", "select_tokens", "token_logprobs"]


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


def select_tokens(logits: torch.Tensor, params, step: int, generator: torch.Generator | None) -> torch.Tensor:
    """``logits`` ``[m, V]`` (already restricted to the real vocabulary) -> token ids ``[m]``."""
    if logits.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=logits.device)
    if is_greedy(params):
        return logits.argmax(dim=-1)
    return torch.multinomial(sampling_probs(logits, params, step), 1, generator=generator).squeeze(-1)


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
