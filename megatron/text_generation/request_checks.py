"""Rank 0's checks of a parsed request against the served model, before the request is broadcast:
its exits and decoding mode, its token ids against the vocabulary, its prompts through the tokenizer
(a prompt the tokenizer rejects, or one that is no tokens at all, is the client's fault: HTTP 400),
and its size against the context length and :attr:`ServerLimits.max_batch_tokens`.

Why here and not in generation: every rank of the model runs ``generate`` with the broadcast request,
and on a pipeline a rank that fails half-way through a generation leaves the others waiting in a
collective. Whatever can be known to fail is refused before any rank starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .request import GenerationRequest, RequestError, ServerLimits, show_value

if TYPE_CHECKING:
    from .server import ModelInfo

__all__ = ["check_request"]


def check_request(request: GenerationRequest, info: "ModelInfo", limits: ServerLimits) -> None:
    """Raise :class:`RequestError` (naming the field) if ``request`` cannot run on the model of ``info``."""
    _check_exits(request, info)
    if request.early_exit.decoding == "speculative":
        _check_speculative(request, info)
    _check_vocabulary(request, info)
    if info.tokenize is None:
        return
    lengths = _prompt_lengths(request, info)
    _check_size(request, info, limits, max(lengths))
    if request.sampling.prevent_newline_after_colon and len(_tokenize(info, "\n", "prevent_newline_after_colon")) != 1:
        raise RequestError("prevent_newline_after_colon", "this model's tokenizer has no single-token newline to "
                                                          "ban; drop the field")


def _check_exits(request: GenerationRequest, info: "ModelInfo") -> None:
    ee, exits = request.early_exit, info.exit_layers
    unknown = sorted(set(ee.exit_layers) - set(exits))
    if unknown:
        raise RequestError("exit_layers", f"layers {show_value(unknown)} have no exit; this model's exits are {exits}")
    if ee.use_early_exit and not exits:
        raise RequestError("use_early_exit", "this model has no exits; drop use_early_exit")
    if not info.estimators:
        for name, used in (("confidence", ee.confidence == "estimator"), ("estimator_floor", ee.estimator_floor is not None)):
            if used:
                raise RequestError(name, "this model's exits have no learned estimator (tune them with "
                                         "--exit-estimator); use another confidence measure")
    if ee.method == "pipeline" and info.pp == 1:
        raise RequestError("method", "the pipeline method needs pipeline parallelism (pp > 1); use "
                                     "'recompute' or 'auto'")


def _check_speculative(request: GenerationRequest, info: "ModelInfo") -> None:
    exits, layer = info.exit_layers, request.early_exit.draft_exit_layer
    if not exits:
        raise RequestError("decoding", "this model has no exits to draft with; use decoding 'full'")
    if layer is not None and layer not in exits:
        raise RequestError("draft_exit_layer", f"layer {layer} has no exit; this model's exits are {exits}")
    if layer is not None and info.num_layers is not None and layer >= info.num_layers:
        raise RequestError("draft_exit_layer", f"layer {layer} is the full depth: drafting there saves "
                                               "nothing; pick an earlier exit")


def _check_vocabulary(request: GenerationRequest, info: "ModelInfo") -> None:
    vocab, s = info.vocab_size, request.sampling
    if vocab is None:
        return
    outside = [t for t in s.stop_token_ids if t >= vocab]
    if outside:
        raise RequestError("stop_token_ids", f"ids {show_value(outside)} are outside the vocabulary (0 to {vocab - 1})")
    if s.beam_width is not None and s.beam_width > vocab:
        raise RequestError("beam_width", f"{s.beam_width} beams are more than the vocabulary's {vocab} tokens")


def _tokenize(info: "ModelInfo", text: str, field_name: str) -> list[int]:
    try:
        return info.tokenize(text)
    except Exception as e:  # noqa: BLE001 -- any tokenizer refusal of the client's text is the client's fault
        raise RequestError(field_name, f"the tokenizer rejects it: {type(e).__name__}: {str(e)[:200]}") from None


def _prompt_lengths(request: GenerationRequest, info: "ModelInfo") -> list[int]:
    bos = int(request.sampling.add_BOS)
    lengths = []
    for i, prompt in enumerate(request.prompts):
        n = len(_tokenize(info, prompt, "prompts")) + bos
        if n == 0:
            raise RequestError("prompts", f"prompt {i} is no tokens at all ({show_value(prompt)}); give it text or "
                                          "set add_BOS: true")
        lengths.append(n)
    return lengths


def _check_size(request: GenerationRequest, info: "ModelInfo", limits: ServerLimits, longest: int) -> None:
    """The context length, and the KV cache the request allocates: rows (prompts, or beams) x positions."""
    s, positions = request.sampling, info.max_positions
    if positions is not None and longest + s.tokens_to_generate > positions:
        field_name = "tokens_to_generate" if longest < positions else "prompts"
        raise RequestError(field_name, f"the longest prompt ({longest} tokens) plus tokens_to_generate "
                                       f"({s.tokens_to_generate}) exceeds the model's {positions} positions; "
                                       f"ask for at most {max(positions - longest, 0)} tokens or shorten it")
    rows = s.beam_width or len(request.prompts)
    total = rows * (longest + s.tokens_to_generate)
    if total > limits.max_batch_tokens:
        field_name = "beam_width" if s.beam_width else "prompts"
        raise RequestError(field_name, f"{rows} rows x ({longest} prompt + {s.tokens_to_generate} generated) tokens "
                                       f"= {total} is over the server's --max-batch-tokens {limits.max_batch_tokens}; "
                                       "send fewer or shorter prompts, fewer beams or fewer tokens")
