"""Response bodies of the inference server, built from a :class:`GenerationResult`: EE-LLM's ``PUT /api``
shape (with its ``requst_time`` typo, which clients read) plus tokens/s and exit statistics, and
OpenAI's ``text_completion`` objects, whole or as server-sent-event chunks.

Convention of the generation core relied on here: ``result.exit_layers[i]`` holds one entry per
generated token of prompt ``i`` (stop token included); ``segments[i]`` are the pieces of the generated
(or, with echo, prompt + generated) tokens, so their concatenation can run past ``texts[i]``, which
omits a final stop token and is cut before a stop sequence.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

from megatron.text_generation.request import GenerationRequest, GenerationResult

__all__ = ["exit_share", "tokens_per_s", "text_pieces", "api_response", "Completion", "completion_response",
           "completion_chunks"]


def exit_share(exit_layers: list[list[int]]) -> dict[str, float]:
    """Share of all generated tokens that left at each layer (the full depth included), keyed by the
    layer number as a string (JSON keys), in layer order."""
    counts = Counter(layer for seq in exit_layers for layer in seq)
    total = sum(counts.values())
    return {str(layer): counts[layer] / total for layer in sorted(counts)}


def tokens_per_s(result: GenerationResult) -> float:
    return result.num_generated / result.elapsed_s if result.elapsed_s > 0 else 0.0


def text_pieces(ids: list[int], detokenize: Callable[[list[int]], str], prefix: list[int] = ()) -> list[str]:
    """One text piece per token of ``ids``: what the token adds to the detokenized text (of ``prefix``
    followed by ``ids``: a generation's pieces after its prompt). Detokenizing tokens one by one is wrong
    for most tokenizers (SentencePiece drops a piece's leading space, byte-level BPE splits characters),
    so each piece is the growth of the detokenized prefix; a token that leaves it unfinished adds ""."""
    prefix = list(prefix)
    pieces, shown = [], detokenize(prefix) if prefix else ""
    for k in range(1, len(ids) + 1):
        text = detokenize(prefix + ids[:k])
        pieces.append(text[len(shown):] if text.startswith(shown) else "")
        shown = text if text.startswith(shown) else shown
    return pieces


def api_response(result: GenerationResult, request_time: float, pieces: list[list[str]] | None = None) -> dict:
    """EE-LLM's ``PUT /api`` body: ``text``, ``segments``, ``logprobs``, ``requst_time``; plus ours:
    ``tokens_per_s``, per-token ``exit_layers``, ``exit_share``, the decoding statistics of
    ``result.stats`` (``speculative``: acceptance rate, drafted and accepted tokens, rounds) and, when
    given, ``token_pieces`` (see :func:`text_pieces`; one per entry of ``result.tokens``)."""
    body = {
        "text": result.texts,
        "segments": result.segments,
        "logprobs": result.logprobs,
        "requst_time": request_time,
        "tokens_per_s": tokens_per_s(result),
        "exit_layers": result.exit_layers,
        "exit_share": exit_share(result.exit_layers),
        **result.stats,
    }
    if pieces is not None:
        body["token_pieces"] = pieces
    return body


@dataclass
class Completion:
    """What an OpenAI response needs beyond the result: the request, the parsed response ``options``
    (see ``parse_completions_request``), the envelope fields, the prompts' token count for ``usage``
    and, to report text pieces per token, the tokenizer's ``detokenize``."""

    request: GenerationRequest
    options: dict
    ident: str
    created: int
    model: str
    prompt_tokens: int = 0
    detokenize: Callable[[list[int]], str] | None = None

    def finish_reason(self, result: GenerationResult, i: int) -> str:
        generated = len(result.exit_layers[i]) if i < len(result.exit_layers) else 0
        return "length" if generated >= self.request.sampling.tokens_to_generate else "stop"

    def pieces(self, result: GenerationResult, i: int) -> list[str]:
        """One text piece per entry of ``result.tokens[i]`` (:func:`text_pieces`); without
        ``detokenize`` the core's segments are used."""
        if self.detokenize is None:
            return list(result.segments[i])
        return text_pieces(result.tokens[i], self.detokenize)

    def logprobs(self, result: GenerationResult, i: int, pieces: list[str]) -> dict | None:
        """OpenAI's per-choice ``logprobs`` object, one entry per token; the first token of an echoed
        prompt has no log-prob (``None``), as in OpenAI's API."""
        if self.options.get("logprobs") is None or result.logprobs is None:
            return None
        lps = list(result.logprobs[i])[-len(pieces):] if pieces else []
        offsets, pos = [], 0
        for piece in pieces:
            offsets.append(pos)
            pos += len(piece)
        return {"tokens": pieces, "token_logprobs": [None] * (len(pieces) - len(lps)) + lps, "top_logprobs": None,
                "text_offset": offsets}

    def envelope(self, choices: list[dict]) -> dict:
        return {"id": self.ident, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices}


def completion_response(result: GenerationResult, c: Completion) -> dict:
    """OpenAI's ``text_completion`` object (``n`` = 1: one choice per prompt) with ``usage``, plus the
    early-exit extras ``exit_layers`` (per choice), ``exit_share``, ``tokens_per_s`` and the decoding
    statistics of ``result.stats`` (``speculative``)."""
    choices = []
    for i, text in enumerate(result.texts):
        choices.append({"text": text, "index": i, "finish_reason": c.finish_reason(result, i),
                        "logprobs": c.logprobs(result, i, c.pieces(result, i)),
                        "exit_layers": result.exit_layers[i] if i < len(result.exit_layers) else []})
    completion = sum(len(seq) for seq in result.exit_layers)
    usage = {"prompt_tokens": c.prompt_tokens, "completion_tokens": completion,
             "total_tokens": c.prompt_tokens + completion}
    return {**c.envelope(choices), "usage": usage, "exit_share": exit_share(result.exit_layers),
            "tokens_per_s": tokens_per_s(result), **result.stats}


def _stream_pieces(text: str, pieces: list[str]) -> list[tuple[str, int | None]]:
    """(piece, token index) pairs that spell ``text`` from its start, then whatever is left as one
    piece without a token (a piece cut by a stop sequence, or pieces that do not add up to the text).
    Empty pieces are skipped."""
    out, pos = [], 0
    for k, piece in enumerate(pieces):
        if pos >= len(text) or not text.startswith(piece, pos):
            break
        if piece:
            out.append((piece, k))
            pos += len(piece)
    if pos < len(text) or not out:
        out.append((text[pos:], None))
    return out


def completion_chunks(result: GenerationResult, c: Completion) -> Iterator[dict]:
    """The ``stream: true`` events: one chunk per token piece of each choice, with that token's
    log-prob when asked for, the last chunk carrying the ``finish_reason``. The core returns whole
    results, so the chunks follow the finished generation."""
    for i, text in enumerate(result.texts):
        pieces = c.pieces(result, i)
        lp = c.logprobs(result, i, pieces)
        stream = _stream_pieces(text, pieces)
        for n, (piece, k) in enumerate(stream):
            chunk_lp = None
            if lp is not None and k is not None:
                chunk_lp = {key: (value[k:k + 1] if isinstance(value, list) else value) for key, value in lp.items()}
            choice = {"text": piece, "index": i, "logprobs": chunk_lp,
                      "finish_reason": c.finish_reason(result, i) if n == len(stream) - 1 else None}
            yield c.envelope([choice])
