"""``generate(engine, request)``: the entry point every rank of the model calls with the same request.

It tokenizes, picks the strategy (scoring when ``tokens_to_generate`` is 0, beam search when
``beam_width`` is set, self-speculative decoding when ``decoding`` is ``speculative``, else
token-by-token decoding with early exit by method A or B), runs it (stage 0 drives, the other stages
serve), broadcasts stage 0's result along the pipeline and detokenizes: the returned
:class:`GenerationResult` is the same on every rank; ``stats`` holds the speculative round statistics.
A failure on any rank ends the generation on every stage (``runner.py``): stage 0 re-raises it, the
others raise :class:`GenerationFailed`, and all of them are ready for the next request.

Conventions. ``tokens``/``segments``/``logprobs``/``exit_layers`` list the generated tokens (prompt plus
generation with ``echo_prompts``; exit layers always cover the generation only). A stop token (the
tokenizer's eod or ``stop_token_ids``) ends its sequence and stays in ``tokens`` but not in ``texts``;
a stop sequence ends it and ``texts`` is cut before the match. Beam search returns the ``beam_width``
best hypotheses (best first) as the result's rows, without log-probs. Scoring returns the prompts with
the log-prob of every prompt token after the first.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from .request import GenerationRequest, GenerationResult
from .sampling import Draws, check_sampling
from .strategies.beam import BeamRunner, beam_loop
from .strategies.early_exit import TokenPicker, exit_rule, resolve_method
from .strategies.scoring import ScoreRunner, score_loop
from .strategies.speculative import SpeculativeRunner
from .strategies.speculative_loop import draft_exit, resolve_decoding, speculative_loop
from .strategies.token_by_token import Decoded, TokenRunner, decode_loop
from .streaming import TextStream, visible_text

__all__ = ["generate", "generate_tokens", "GenerationFailed"]


class GenerationFailed(RuntimeError):
    """A generation failed on some rank; every rank of the model raises it (the others are ready for the
    next request)."""


def _stop_ids(engine, sampling) -> set[int]:
    ids = set(int(t) for t in sampling.stop_token_ids)
    if engine.tokenizer is not None and engine.tokenizer.eod is not None and engine.tokenizer.eod >= 0:
        ids.add(int(engine.tokenizer.eod))
    return ids


def _newline_ban(engine, sampling):
    """(newline id, bool ``[vocab]``: the ids whose text ends with ':') or None."""
    if not sampling.prevent_newline_after_colon:
        return None
    tok = engine.tokenizer
    newline = tok.tokenize("\n")
    if len(newline) != 1:
        raise ValueError("prevent_newline_after_colon: the tokenizer has no single-token newline")
    colons = torch.tensor([tok.detokenize([i]).endswith(":") for i in range(engine.vocab)], dtype=torch.bool)
    return newline[0], colons.to(engine.device)


def _max_prob_printer(engine):
    """print_max_prob: once per model replica (tp rank 0 of each stage prints its own exits)."""
    if engine.state.tp_rank != 0:
        return None
    detok = engine.tokenizer.detokenize

    def report(layer: int, tokens: torch.Tensor, probs: torch.Tensor) -> None:
        shown = ", ".join(f"[{detok([int(t)])!r}] {float(p):.4f}" for t, p in zip(tokens, probs))
        print(f"layer [{layer}]: {shown}", flush=True)

    return report


def _draws(engine, sampling) -> Draws:
    return Draws(engine.agree_seed(sampling.random_seed), engine.device)


def _token_runner(engine, sampling, ee_params, prompts: list[list[int]], max_len: int) -> TokenRunner:
    rule = exit_rule(ee_params, engine.ee_config)
    method = resolve_method(ee_params, engine.state.pp)
    printer = _max_prob_printer(engine) if ee_params.print_max_prob else None
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=engine.device)
    picker = TokenPicker(rule, sampling, _draws(engine, sampling), num_layers=engine.num_layers,
                         newline_ban=_newline_ban(engine, sampling), report=printer, lags=lengths - lengths.min())
    return TokenRunner(engine, len(prompts), max_len, method, picker)


def generate_tokens(engine, prompts: list[list[int]], sampling, ee_params, observer=None, emit=None) -> Decoded:
    """Token-level generation on every rank (same arguments everywhere); returns stage 0's result on
    every stage. ``observer(runner, header)`` sees each stage's cache after every step (tests);
    ``emit(i, tokens, exit_layers, logprobs)`` (stage 0) receives the tokens of sequence ``i`` as soon as
    they are decided (streaming; beam search reports its hypotheses only at the end)."""
    check_sampling(sampling)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: every prompt needs at least one token (set add_BOS for empty prompts)")
    stop_ids = _stop_ids(engine, sampling)
    max_len = max(len(p) for p in prompts) + max(sampling.tokens_to_generate, 0)
    _check_positions(engine.config, max_len)
    mode = resolve_decoding(ee_params)
    if mode == "early_exit" and not ee_params.use_early_exit:
        ee_params = replace(ee_params, use_early_exit=True)
    stop_check = _stop_sequence_check(engine, sampling)
    if sampling.beam_width is not None:
        if mode == "speculative":
            raise ValueError("beam_width: beam search runs at full depth; use decoding 'full'")
        runner, loop = _beam(engine, prompts, sampling, ee_params, stop_ids, max_len)
    elif sampling.tokens_to_generate == 0:
        runner = ScoreRunner(engine, len(prompts), max_len)
        loop = lambda: _scored(runner, prompts)  # noqa: E731
    elif mode == "speculative":
        layer = draft_exit(ee_params, list(engine.ee_config.exit_layer_nums), engine.num_layers)
        runner = SpeculativeRunner(engine, len(prompts), max_len, layer, sampling, _draws(engine, sampling),
                                   newline_ban=_newline_ban(engine, sampling))
        loop = lambda: speculative_loop(  # noqa: E731
            runner, prompts, sampling, stop_ids=stop_ids, stop_check=stop_check,
            k=ee_params.num_speculative_tokens, num_layers=engine.num_layers, emit=emit)
    else:
        runner = _token_runner(engine, sampling, ee_params, prompts, max_len)
        cap = ee_params.recompute_cap if runner.picker.rule is not None else None
        loop = lambda: decode_loop(runner, prompts, sampling, stop_ids=stop_ids, stop_check=stop_check,  # noqa: E731
                                   recompute_cap=cap, emit=emit)
    runner.observer = observer
    return _run(engine, runner, loop)


def _run(engine, runner, loop) -> Decoded:
    """Stage 0 runs the strategy's loop, the other stages serve it; stage 0's result (or its failure)
    is broadcast along the pipeline. A failure on stage 0, or reported by a later stage, ends the
    generation on every stage first (``runner.py``), so every rank is ready for the next request."""
    if not engine.is_first:
        runner.serve()
        out = engine.broadcast_from_first(None)
    else:
        try:
            out = loop()
        except Exception as e:  # noqa: BLE001 -- re-raised below, after every stage has ended the generation
            runner.finish()
            engine.broadcast_from_first(f"{type(e).__name__}: {e}")
            raise
        out = engine.broadcast_from_first(out)
    if isinstance(out, str):
        raise GenerationFailed(f"generation failed: {out}")
    return out


def _scored(runner, prompts) -> Decoded:
    lp = score_loop(runner, prompts)
    return Decoded([[] for _ in prompts], [[] for _ in prompts], [[] for _ in prompts], prompt_logprobs=lp)


def _check_positions(cfg, max_len: int) -> None:
    if cfg.position_embedding_type != "learned_absolute":
        return
    limit = cfg.max_position_embeddings or cfg.seq_length
    if max_len > limit:
        raise ValueError(f"prompts: the longest prompt plus tokens_to_generate is {max_len} tokens, more than the "
                         f"model's {limit} learned positions; shorten the prompt or generate fewer tokens")


def _beam(engine, prompts, sampling, ee_params, stop_ids, max_len):
    if len(prompts) != 1:
        raise ValueError(f"beam_width: beam search takes exactly one prompt, got {len(prompts)}")
    if ee_params.use_early_exit:
        raise ValueError("beam_width: beam search runs at full depth; set use_early_exit to false")
    width = sampling.beam_width
    runner = BeamRunner(engine, width, max_len, beam_k=min(2 * width, engine.vocab))

    def loop() -> Decoded:
        beams, scores = beam_loop(runner, prompts[0], sampling, stop_ids)
        full = [[engine.num_layers] * len(b) for b in beams]
        return Decoded(beams, [[] for _ in beams], full, extra={"scores": scores})

    return runner, loop


def _stop_sequence_check(engine, sampling):
    if not sampling.stop_sequences:
        return None
    detok = engine.tokenizer.detokenize
    return lambda i, ids: any(s in detok(ids) for s in sampling.stop_sequences)


def generate(engine, request: GenerationRequest, stream=None) -> GenerationResult:
    """Serve one request; call on every rank of the model. The result is returned on every rank.
    ``stream(Delta)`` (stage 0; see ``streaming.py``) receives the generated text as it is decided, then
    each sequence's last delta once the result is complete."""
    start = time.perf_counter()
    sampling, tok = request.sampling, engine.tokenizer
    prompts = [tok.tokenize(p) for p in request.prompts]
    if sampling.add_BOS:
        prompts = [[tok.eod] + p for p in prompts]
    stop_ids = _stop_ids(engine, sampling)
    echo = sampling.echo_prompts or sampling.tokens_to_generate == 0
    text_stream = None
    if stream is not None and engine.is_first:
        text_stream = TextStream(tok.detokenize, prompts, echo=echo, stop_ids=stop_ids, stops=sampling.stop_sequences,
                                 on_delta=stream)
    out = generate_tokens(engine, prompts, sampling, request.early_exit, emit=text_stream and text_stream.emit)
    if sampling.beam_width is not None:
        prompts = prompts * len(out.tokens)
    texts, segments, tokens, logprobs = [], [], [], []
    for i, gen in enumerate(out.tokens):
        shown = gen[:-1] if gen and gen[-1] in stop_ids else gen
        texts.append(visible_text(tok.detokenize, prompts[i] if echo else [], shown, sampling.stop_sequences))
        all_ids = prompts[i] + gen if echo else gen
        segments.append([tok.detokenize([t]) for t in all_ids])
        tokens.append(all_ids)
        logprobs.append(out.logprobs[i])
    if sampling.tokens_to_generate == 0:
        logprobs = out.prompt_logprobs
    elif sampling.logprobs and sampling.echo_prompts and sampling.beam_width is None:
        scored = generate_tokens(engine, prompts, replace(sampling, tokens_to_generate=0), request.early_exit)
        logprobs = [p + g for p, g in zip(scored.prompt_logprobs, logprobs)]
    want_lp = (sampling.logprobs or sampling.tokens_to_generate == 0) and sampling.beam_width is None
    stats = {key: value for key, value in out.extra.items() if key == "speculative"}
    if text_stream is not None:
        for delta in text_stream.close(texts):
            stream(delta)
    return GenerationResult(texts=texts, segments=segments, tokens=tokens, logprobs=logprobs if want_lp else None,
                            exit_layers=out.exit_layers, num_generated=sum(len(t) for t in out.tokens),
                            elapsed_s=time.perf_counter() - start, stats=stats)
