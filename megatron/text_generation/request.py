"""Generation requests: the dataclasses shared by the server and the generation core, the parsers that
turn HTTP JSON bodies (EE-LLM's ``PUT /api`` and OpenAI's ``POST /v1/completions``) into them, and the
rank-0-to-all broadcast of a request (or of the shutdown message) before every rank calls ``generate``.

Every invalid field raises :class:`RequestError` naming the field; the server answers it with HTTP 400.
Every field is bounded here, before any rank sees the request: a value that passes cannot overflow a
tensor, a seed or a division in generation (on a pipeline, one rank failing mid-generation leaves the
others waiting). :class:`ServerLimits` holds the bounds that are flags of the launcher (request size,
prompts, beams, batch tokens, connections, timeouts). The bugs of EE-LLM's parser (``MegatronGenerate.put``
in its ``megatron/early_exit_text_generation_server.py``) are fixed here: booleans are read by value, ints
are accepted where floats are, the default threshold means "no early exit", ``stop_sequences`` and
``beam_width`` work, and a missing ``top_p`` never crashes the ``top_p_decay`` / ``top_p_bound`` checks.
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .confidence import MEASURES

__all__ = [
    "SamplingParams", "EarlyExitParams", "GenerationRequest", "GenerationResult", "RequestError", "ServerLimits",
    "DEFAULT_LIMITS", "parse_api_request", "parse_completions_request", "broadcast_request", "show_value", "SHUTDOWN",
    "MAX_PROMPTS", "EXIT_METHODS", "DECODING_MODES", "MAX_SPECULATIVE_TOKENS", "RECOMPUTE_CAP",
]

MAX_PROMPTS = 128
MAX_TOP_K = 1000
MAX_TEMPERATURE = 100.0
# Below this, logits / temperature overflows float32 for large logits (NaN probabilities); sampling there is
# greedy in effect anyway, and temperature 0 asks for greedy.
MIN_TEMPERATURE = 1e-4
MAX_INT = 2**31 - 1  # every integer field (ids, lengths, layers, caps): fits any index tensor
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range
MAX_LENGTH_PENALTY = 10.0  # length ** penalty stays finite and non-zero in float64 for any context length
MAX_THRESHOLD_DECAY = 1e4
MAX_LIST_ITEMS = 1024  # stop_token_ids, exit_layers
MAX_STOP_SEQUENCES = 64
EXIT_METHODS = ("auto", "recompute", "pipeline")
DECODING_MODES = ("full", "early_exit", "speculative")
MAX_SPECULATIVE_TOKENS = 64
# method A: after this many consecutive steps where every sequence exited, one step runs every layer
# (tokens unchanged), so the re-fed window never exceeds it (EE-LLM's grew without bound: reference bug 21)
RECOMPUTE_CAP = 16
SHUTDOWN = "shutdown"  # the broadcast message that ends the non-zero ranks' serving loop


@dataclass
class SamplingParams:
    tokens_to_generate: int = 64  # 0 = scoring: return log-probs of the prompt only
    top_k: int = 0  # 0 = off
    top_p: float = 0.0  # 0 = off; cannot combine with top_k > 0
    top_p_decay: float = 0.0
    top_p_bound: float = 0.0
    temperature: float = 1.0  # the HTTP layer maps EE-LLM's temperature 0 -> greedy (top_k = 1)
    greedy: bool = False
    random_seed: int | None = None
    logprobs: bool = False
    echo_prompts: bool = False
    add_BOS: bool = False
    stop_token_ids: list[int] = field(default_factory=list)  # the tokenizer's eod is always a stop token
    stop_sequences: list[str] = field(default_factory=list)  # matched on detokenized text
    prevent_newline_after_colon: bool = False
    beam_width: int | None = None  # beam search when set (>= 1)
    length_penalty: float = 1.0


@dataclass
class EarlyExitParams:
    use_early_exit: bool = False
    early_exit_thres: float = 1.0  # exit when confidence >= thres; 1.0 = practically never
    exit_layers: list[int] = field(default_factory=list)  # [] = every exit may fire
    method: str = "auto"  # "recompute" (A), "pipeline" (B), "auto": B if pp > 1 else A
    recompute_cap: int | None = RECOMPUTE_CAP  # full-depth pass after this many consecutive exits (A); None: unbounded
    use_temperature: bool = False  # apply --exit-layer-temperature to exit logits for the confidence
    print_max_prob: bool = False
    confidence: str = "top1"  # top1, margin, entropy or cosine (see confidence.py)
    threshold_decay: float | None = None  # None / 0: constant threshold; else CALM's decay temperature tau
    estimator_floor: float | None = None  # measure an exit only where its learned estimate reaches this (None: off)
    # "full", "early_exit" (use_early_exit: true is the older spelling) or "speculative": drafts from
    # draft_exit_layer (None: the first exit), num_speculative_tokens per round, verified at full depth
    decoding: str = "full"
    draft_exit_layer: int | None = None
    num_speculative_tokens: int = 4


@dataclass
class GenerationRequest:
    prompts: list[str]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    early_exit: EarlyExitParams = field(default_factory=EarlyExitParams)


@dataclass
class GenerationResult:
    texts: list[str]  # prompt + generation if echo_prompts else generation only
    segments: list[list[str]]  # per-token detokenized pieces (generation, or all if echo)
    tokens: list[list[int]]
    logprobs: list[list[float]] | None
    exit_layers: list[list[int]]  # per generated token, the layer it left at (num_layers = full depth)
    num_generated: int
    elapsed_s: float
    stats: dict = field(default_factory=dict)  # decoding statistics, e.g. "speculative": acceptance rate


@dataclass(frozen=True)
class ServerLimits:
    """What one request or client may take of the server; each is a flag of the launcher (``server_launch``).
    ``max_batch_tokens`` bounds rows x (longest prompt + ``tokens_to_generate``), rows being the prompts or
    the beams: the KV cache a request allocates on every rank. ``read_timeout_s`` bounds the time a client
    may take to send its headers and body; ``sync_timeout_s`` how long rank 0 waits, after a request, for
    every rank to confirm that it finished it (longer means the ranks can no longer agree)."""

    max_body_bytes: int = 4 << 20
    max_prompts: int = MAX_PROMPTS
    max_beam_width: int = 16
    max_batch_tokens: int = 32768
    max_connections: int = 64
    read_timeout_s: float = 30.0
    sync_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"ServerLimits.{f.name} must be a positive number, got {value!r}")


DEFAULT_LIMITS = ServerLimits()


def show_value(value: Any) -> str:
    """A short repr of a client's value for an error message: long strings, huge numbers and deep or
    long containers are abbreviated (a plain repr of a 1,000-deep list raises RecursionError)."""
    return _SHORT.repr(value)


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxlong, _SHORT.maxother = 3, 60, 40, 60
_SHORT.maxlist = _SHORT.maxdict = _SHORT.maxtuple = 6


class RequestError(ValueError):
    """An invalid request field; the server answers ``{"error": reason, "field": field}`` with HTTP 400."""

    def __init__(self, field_name: str, reason: str):
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name
        self.reason = reason


# ----------------------------------------------------------------------------------------- field readers

class _Fields:
    """Typed, checked access to a JSON object's fields; records which keys were read so that unknown
    keys can be rejected (a typo such as ``temprature`` must not be silently ignored)."""

    def __init__(self, body: Any, known_extra: tuple[str, ...] = ()):
        if not isinstance(body, dict):
            raise RequestError("body", f"the request body must be a JSON object, got {type(body).__name__}")
        self.body = body
        self.read: set[str] = set(known_extra)

    def has(self, name: str) -> bool:
        return name in self.body and self.body[name] is not None

    def raw(self, name: str, default: Any = None) -> Any:
        self.read.add(name)
        return self.body[name] if self.has(name) else default

    def bool(self, name: str, default: bool) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise RequestError(name, f"must be a boolean (true or false), got {show_value(value)}")
        return value

    def int(self, name: str, default: int | None, lo: int = 0, hi: int = MAX_INT) -> int | None:
        value = self.raw(name, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(name, f"must be an integer, got {show_value(value)}")
        _check_range(name, value, lo, hi)
        return value

    def float(self, name: str, default: float, lo: float, hi: float) -> float:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RequestError(name, f"must be a finite number, got {show_value(value)}")
        _check_range(name, value, lo, hi)
        return float(value)

    def int_list(self, name: str) -> list[int]:
        value = self.raw(name, [])
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise RequestError(name, f"must be a list of integers, got {show_value(value)}")
        _check_count(name, value, MAX_LIST_ITEMS)
        for v in value:
            _check_range(name, v, 0, MAX_INT)
        return list(value)

    def str_list(self, name: str, allow_str: bool = True, max_items: int = MAX_STOP_SEQUENCES) -> list[str]:
        value = self.raw(name, [])
        if allow_str and isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or any(not isinstance(v, str) for v in value):
            raise RequestError(name, f"must be a list of strings, got {show_value(value)}")
        _check_count(name, value, max_items)
        for i, text in enumerate(value):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # JSON allows lone surrogates ("\ud800"); no tokenizer does
                raise RequestError(name, f"string {i} is not valid Unicode text ({e.reason} at position "
                                         f"{e.start}: a lone surrogate escape?)") from None
        return list(value)

    def reject_unknown(self) -> None:
        unknown = sorted(set(self.body) - self.read)
        if unknown:
            name = unknown[0][:100]
            raise RequestError(name, f"unknown field {show_value(unknown[0])}; check its spelling")


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    if value < lo:
        raise RequestError(name, f"must be >= {lo}, got {show_value(value)}")
    if value > hi:
        raise RequestError(name, f"must be <= {hi}, got {show_value(value)}")


def _check_count(name: str, items: list, most: int) -> None:
    if len(items) > most:
        raise RequestError(name, f"holds {len(items)} items; at most {most} are allowed")


def _prompts(f: _Fields, name: str, add_bos: bool, limits: ServerLimits) -> list[str]:
    most = limits.max_prompts
    if not f.has(name):
        raise RequestError(name, f"is required: a string or a list of 1 to {most} strings")
    prompts = f.str_list(name, max_items=most)
    if not prompts:
        raise RequestError(name, f"must hold 1 to {most} prompts, got none")
    if not add_bos and any(p == "" for p in prompts):
        raise RequestError(name, "an empty prompt needs add_BOS: true (there is no token to start from)")
    return prompts


def _early_exit(f: _Fields, default_thres: float) -> EarlyExitParams:
    method = f.raw("method", "auto")
    if not isinstance(method, str) or method not in EXIT_METHODS:
        raise RequestError("method", f"must be one of {', '.join(EXIT_METHODS)}, got {show_value(method)}")
    exit_layers = f.int_list("exit_layers")
    if any(layer < 1 for layer in exit_layers):
        raise RequestError("exit_layers", f"layers are numbered from 1, got {show_value(exit_layers)}")
    decoding = _decoding(f)
    measure, decay, floor = _confidence(f, decoding)
    return EarlyExitParams(
        use_early_exit=decoding == "early_exit",
        decoding=decoding,
        draft_exit_layer=f.int("draft_exit_layer", None, lo=1),
        num_speculative_tokens=f.int("num_speculative_tokens", 4, lo=1, hi=MAX_SPECULATIVE_TOKENS),
        early_exit_thres=f.float("early_exit_thres", default_thres, lo=0.0, hi=1.0),
        exit_layers=exit_layers,
        method=method,
        recompute_cap=f.int("recompute_cap", RECOMPUTE_CAP, lo=1),
        use_temperature=f.bool("use_exit_temperature", False),
        print_max_prob=f.bool("print_max_prob", False),
        confidence=measure,
        threshold_decay=decay,
        estimator_floor=floor,
    )


def _confidence(f: _Fields, decoding: str) -> tuple[str, float | None, float | None]:
    """``confidence`` (the measure), ``threshold_decay`` (CALM's tau; absent or null: a constant
    threshold) and ``estimator_floor`` (absent or null: off). They shape early exits only and are refused
    with another decoding (they would be silently ignored)."""
    if decoding != "early_exit":
        for name in ("confidence", "threshold_decay", "estimator_floor"):
            if f.has(name):
                raise RequestError(name, "only applies to decoding 'early_exit' (or use_early_exit: true)")
    measure = f.raw("confidence", "top1")
    if not isinstance(measure, str) or measure not in MEASURES:
        raise RequestError("confidence", f"must be one of {', '.join(MEASURES)}, got {show_value(measure)}")
    f.read.add("threshold_decay")
    decay = f.float("threshold_decay", 0.0, lo=0.0, hi=MAX_THRESHOLD_DECAY) if f.has("threshold_decay") else None
    f.read.add("estimator_floor")
    floor = f.float("estimator_floor", 0.0, lo=0.0, hi=1.0) if f.has("estimator_floor") else None
    return measure, decay, floor


def _decoding(f: _Fields) -> str:
    """``decoding``, reconciled with the older ``use_early_exit`` flag; the speculative-only fields
    are refused with another mode (they would be silently ignored)."""
    use_ee = f.bool("use_early_exit", False)
    decoding = f.raw("decoding", None)
    if decoding is None:
        decoding = "early_exit" if use_ee else "full"
    elif not isinstance(decoding, str) or decoding not in DECODING_MODES:
        raise RequestError("decoding", f"must be one of {', '.join(DECODING_MODES)}, got {show_value(decoding)}")
    elif use_ee and decoding != "early_exit":
        raise RequestError("use_early_exit", f"contradicts decoding {decoding!r}; drop use_early_exit (decoding "
                                             "'early_exit' replaces it)")
    if decoding != "speculative":
        for name in ("draft_exit_layer", "num_speculative_tokens"):
            if f.has(name):
                raise RequestError(name, "only applies to decoding 'speculative'")
    return decoding


def _apply_temperature(f: _Fields, sampling: SamplingParams, default: float, hi: float) -> None:
    """EE-LLM's rule: temperature 0 means greedy (top-k 1, no top-p); sampling then runs at 1.0."""
    temperature = f.float("temperature", default, lo=0.0, hi=hi)
    if 0.0 < temperature < MIN_TEMPERATURE:
        raise RequestError("temperature", f"must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {temperature}: "
                                          "smaller ones overflow the scaled logits")
    if temperature == 0.0:
        sampling.greedy, sampling.top_k, sampling.top_p, sampling.temperature = True, 1, 0.0, 1.0
    else:
        sampling.temperature = temperature


# ------------------------------------------------------------------------------------------- PUT /api

def parse_api_request(body: Any, limits: ServerLimits = DEFAULT_LIMITS) -> GenerationRequest:
    """EE-LLM's ``PUT /api`` body (the fields ``MegatronGenerate.put`` reads) -> :class:`GenerationRequest`,
    with its bugs fixed."""
    f = _Fields(body, known_extra=("no_log", "token_pieces"))
    for legacy, current in (("max_len", "tokens_to_generate"), ("sentences", "prompts")):
        if legacy in f.body:
            raise RequestError(legacy, f"is a legacy field name; use {current!r}")
    f.bool("no_log", False)
    f.bool("token_pieces", False)  # shapes the response (text piece per token), read by the server
    add_bos = f.bool("add_BOS", False)
    prompts = _prompts(f, "prompts", add_bos, limits)
    tokens = f.int("tokens_to_generate", 64)
    top_k = f.int("top_k", 0, hi=MAX_TOP_K)
    top_p = f.float("top_p", 0.0, lo=0.0, hi=1.0)
    if top_k > 0 and top_p > 0.0:
        raise RequestError("top_p", "cannot be combined with top_k > 0; set one of them to 0")
    sampling = SamplingParams(
        tokens_to_generate=tokens, top_k=top_k, top_p=top_p,
        top_p_decay=_top_p_dependent(f, "top_p_decay", top_p),
        top_p_bound=_top_p_dependent(f, "top_p_bound", top_p),
        random_seed=f.int("random_seed", 1234, hi=MAX_SEED),
        logprobs=f.bool("logprobs", False) or tokens == 0,  # scoring returns the prompt's log-probs
        echo_prompts=f.bool("echo_prompts", False),
        add_BOS=add_bos,
        stop_token_ids=f.int_list("stop_token_ids"),
        stop_sequences=f.str_list("stop_sequences") + _eol_stops(f),
        prevent_newline_after_colon=f.bool("prevent_newline_after_colon", False),
        beam_width=f.int("beam_width", None, lo=1, hi=limits.max_beam_width),
        length_penalty=f.float("length_penalty", 1.0, lo=-MAX_LENGTH_PENALTY, hi=MAX_LENGTH_PENALTY),
    )
    if "" in sampling.stop_sequences:
        raise RequestError("stop_sequences", "an empty stop sequence would stop before the first token")
    _apply_temperature(f, sampling, 0.0, MAX_TEMPERATURE)
    early_exit = _early_exit(f, default_thres=1.0)
    if sampling.beam_width is not None:
        _check_beam(sampling, early_exit, len(prompts))
    f.reject_unknown()
    return GenerationRequest(prompts=prompts, sampling=sampling, early_exit=early_exit)


def _check_beam(sampling: SamplingParams, early_exit: EarlyExitParams, num_prompts: int) -> None:
    """Beam search runs one prompt at full depth and generates at least one token; the options it does
    not apply are refused rather than silently ignored."""
    if num_prompts != 1:
        raise RequestError("beam_width", f"beam search takes exactly one prompt, got {num_prompts}")
    if early_exit.decoding != "full":
        field_name = "use_early_exit" if early_exit.decoding == "early_exit" else "decoding"
        raise RequestError(field_name, "beam search runs at full depth; drop beam_width or use decoding 'full'")
    if sampling.tokens_to_generate == 0:
        raise RequestError("beam_width", "beam search needs tokens_to_generate >= 1 (0 scores the prompt)")
    if sampling.prevent_newline_after_colon:
        raise RequestError("prevent_newline_after_colon", "beam search does not apply it; drop one of the two")


def _eol_stops(f: _Fields) -> list[str]:
    """Upstream Megatron's ``stop_on_eol`` / ``stop_on_double_eol`` flags, as stop sequences."""
    stops = ["\n"] if f.bool("stop_on_eol", False) else []
    return stops + (["\n\n"] if f.bool("stop_on_double_eol", False) else [])


def _top_p_dependent(f: _Fields, name: str, top_p: float) -> float:
    if not f.has(name):
        f.read.add(name)
        return 0.0
    if top_p == 0.0:
        raise RequestError(name, "requires top_p > 0")
    value = f.float(name, 0.0, lo=0.0, hi=1.0)
    if name == "top_p_bound" and not 0.0 < value <= top_p:
        raise RequestError(name, f"must satisfy 0 < top_p_bound <= top_p ({top_p}), got {value}")
    return value


# ------------------------------------------------------------------------------- POST /v1/completions

def parse_completions_request(body: Any, limits: ServerLimits = DEFAULT_LIMITS) -> tuple[GenerationRequest, dict]:
    """OpenAI ``POST /v1/completions`` body -> (request, options). ``options`` holds what shapes the
    response rather than the generation: ``model`` (echoed back), ``stream``, ``logprobs`` (the count
    asked for; only the chosen token's log-prob is returned) and ``echo``."""
    f = _Fields(body, known_extra=("user",))
    for name, neutral in (("best_of", 1), ("frequency_penalty", 0), ("presence_penalty", 0)):
        if f.raw(name, neutral) != neutral:
            raise RequestError(name, f"is not supported; leave it at {neutral}")
    prompts = _prompts(f, "prompt", add_bos=False, limits=limits)
    n = f.int("n", 1)
    if n != 1:
        raise RequestError("n", f"only n = 1 is supported, got {n}")
    model = f.raw("model", "ee-megatron")
    if not isinstance(model, str):
        raise RequestError("model", f"must be a string, got {show_value(model)}")
    logprobs = f.int("logprobs", None, hi=5)
    echo = f.bool("echo", False)
    sampling = SamplingParams(
        tokens_to_generate=f.int("max_tokens", 16),
        top_p=f.float("top_p", 1.0, lo=0.0, hi=1.0),
        random_seed=f.int("seed", None, hi=MAX_SEED),
        logprobs=logprobs is not None or f.body.get("max_tokens") == 0,
        echo_prompts=echo,
        stop_sequences=f.str_list("stop"),
    )
    if sampling.top_p == 1.0:
        sampling.top_p = 0.0  # OpenAI's 1.0 means "no nucleus truncation", ours is 0
    if "" in sampling.stop_sequences:
        raise RequestError("stop", "an empty stop sequence would stop before the first token")
    _apply_temperature(f, sampling, 1.0, 2.0)
    early_exit = _early_exit(f, default_thres=1.0)
    options = {"model": model, "stream": f.bool("stream", False), "logprobs": logprobs, "echo": echo}
    f.reject_unknown()
    return GenerationRequest(prompts=prompts, sampling=sampling, early_exit=early_exit), options


# ------------------------------------------------------------------------------------------ broadcast

def broadcast_request(request: GenerationRequest | str | None, state) -> GenerationRequest | str:
    """Send global rank 0's request (or :data:`SHUTDOWN`) to every rank; the others pass ``None`` and
    get it back. Uses the default (world) group: the whole model, every tp x pp rank, must call
    ``generate`` with the same request. Skipped in a single process."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized() \
            or torch.distributed.get_world_size() == 1:
        return request
    payload = [request if torch.distributed.get_rank() == 0 else None]
    device = None
    if torch.distributed.get_backend() == "nccl":
        device = state.device  # NCCL moves the pickled bytes through this rank's GPU
    torch.distributed.broadcast_object_list(payload, src=0, device=device)
    return payload[0]
