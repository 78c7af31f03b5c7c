"""Streaming: the tokens generation decides on stage 0, as text deltas the moment they are decided.

The decoding loops call ``emit(i, tokens, exit_layers, logprobs)`` on stage 0 as soon as tokens of
sequence ``i`` are decided (one per step token by token with exits, an accepted run per speculative
round; beam search only at the end). :class:`TextStream` turns them into :class:`Delta` s whose texts
concatenate to exactly the result's ``texts[i]`` (:func:`visible_text`): a final stop token adds no
text, and text that could still turn out to start a stop sequence (or an unfinished character) is held
back until the next tokens or the end of the generation decide it. :func:`delta_chunk` and
:func:`summary_chunk` shape them as OpenAI ``text_completion`` stream chunks (plus the exit layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .server_responses import completion_response, text_pieces

__all__ = ["visible_text", "Delta", "TextStream", "delta_chunk", "summary_chunk"]


def visible_text(detokenize: Callable[[list[int]], str], prompt: list[int], gen: list[int], stops: list[str]) -> str:
    """Detokenized prompt (when echoed: ``prompt`` non-empty) and generation, cut before the first stop
    sequence in the generated part."""
    prefix = detokenize(prompt) if prompt else ""
    full = detokenize(prompt + gen) if prompt + gen else ""
    generated = full[len(prefix):] if full.startswith(prefix) else (detokenize(gen) if gen else "")
    hits = [generated.find(s) for s in stops if s in generated]
    return full[: len(full) - len(generated)] + (generated[: min(hits)] if hits else generated)


@dataclass
class Delta:
    """New text of sequence ``index`` and the tokens decided with it (ids, one text piece per token,
    exit layers, log-probs, and each piece's offset in the sequence's text); ``finished``: the last one."""

    index: int
    text: str
    tokens: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    finished: bool = False


@dataclass
class _Sequence:
    prompt: list[int]
    gen: list[int] = field(default_factory=list)
    sent: str = ""
    pieces_len: int = 0


class TextStream:
    """One request's streams on stage 0. ``prompts``: token ids per sequence (echoed when ``echo``);
    ``stop_ids``: tokens that end a sequence (not shown); ``on_delta(Delta)`` receives the deltas."""

    def __init__(self, detokenize, prompts: list[list[int]], *, echo: bool, stop_ids: set[int], stops: list[str],
                 on_delta: Callable[[Delta], None]):
        self.detokenize, self.echo, self.stop_ids, self.stops = detokenize, echo, set(stop_ids), list(stops)
        self.on_delta = on_delta
        self.seqs = [_Sequence(list(p)) for p in prompts]
        self.started = False

    def _text(self, seq: _Sequence) -> str:
        shown = seq.gen[:-1] if seq.gen and seq.gen[-1] in self.stop_ids else seq.gen
        return visible_text(self.detokenize, seq.prompt if self.echo else [], shown, self.stops)

    def _held(self, text: str) -> int:
        """Characters at the end of ``text`` that may still change: the longest suffix that is a proper
        prefix of a stop sequence, and trailing replacement characters (a character cut between tokens)."""
        held = max((n for s in self.stops for n in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:n])),
                   default=0)
        return max(held, len(text) - len(text.rstrip("\ufffd")))

    def emit(self, i: int, tokens: list[int], exit_layers: list[int], logprobs: list[float]) -> None:
        """The decoding loops' ``emit``."""
        seq = self.seqs[i]
        before = (seq.prompt if self.echo else []) + seq.gen
        seq.gen += tokens
        text = self._text(seq)
        safe = text[: len(text) - self._held(text)]
        delta = ""
        if safe.startswith(seq.sent):  # else the detokenized text was rewritten: wait until it settles
            delta, seq.sent = safe[len(seq.sent):], safe
        pieces = text_pieces(tokens, self.detokenize, before)
        offsets = []
        for piece in pieces:
            offsets.append(seq.pieces_len)
            seq.pieces_len += len(piece)
        self.started = True
        self.on_delta(Delta(i, delta, list(tokens), pieces, list(exit_layers), list(logprobs), offsets))

    def close(self, texts: list[str]) -> list[Delta]:
        """The end of generation: each sequence's remaining text (``texts``: the result's)."""
        out = []
        for i, text in enumerate(texts):
            sent = self.seqs[i].sent if i < len(self.seqs) else ""
            out.append(Delta(i, text[len(sent):] if text.startswith(sent) else "", finished=True))
        return out


def delta_chunk(c, delta: Delta, finish_reason: str | None = None) -> dict:
    """An OpenAI stream chunk of one delta (``c``: the request's ``server_responses.Completion``), with
    the exit layer of each of its tokens; log-probs (chosen tokens only) when the request asked."""
    logprobs = None
    if c.options.get("logprobs") is not None:
        logprobs = {"tokens": delta.pieces, "token_logprobs": delta.logprobs, "top_logprobs": None,
                    "text_offset": delta.offsets}
    choice = {"text": delta.text, "index": delta.index, "logprobs": logprobs, "finish_reason": finish_reason,
              "exit_layers": delta.exit_layers}
    return c.envelope([choice])


def summary_chunk(c, result) -> dict:
    """The stream's last chunk: no choices; the usage and early-exit statistics of the whole result (as the
    non-streamed response has them)."""
    return {**completion_response(result, c), "choices": []}
