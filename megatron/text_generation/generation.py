"""``generate(engine, request)``: the entry point every rank of the model calls with the same request.

It tokenizes, picks the strategy (scoring when ``tokens_to_generate`` is 0, beam search when
``beam_width`` is set, self-speculative decoding when ``decoding`` is ``speculative``, else
token-by-token decoding with early exit by method A or B), runs it (stage 0 drives, the other stages
serve), broadcasts stage 0's result along the pipeline and detokenizes: the returned
:class:`GenerationResult` is the same on every rank; ``stats`` holds the speculative round statistics.

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

from .beam import beam_loop
from .decode import Decoded, decode_loop, score_loop
from .early_exit import ExitPolicy, TokenPicker, resolve_method
from .request import GenerationRequest, GenerationResult
from .sampling import check_sampling
from .speculative import SpeculativeRunner
from .speculative_decode import draft_exit, resolve_decoding, speculative_loop
from .stage import StageRunner

__all__ = ["generate", "generate_tokens"]


def _stop_ids(engine, sampling) -> set[int]:
    ids = set(int(t) for t in sampling.stop_token_ids)
    if engine.tokenizer is not None and engine.tokenizer.eod is not None and engine.tokenizer.eod >= 0:
        ids.add(int(engine.tokenizer.eod))
    return ids


def _newline_ban(engine, sampling):
    if not sampling.prevent_newline_after_colon:
        return None
    tok = engine.tokenizer
    newline = tok.tokenize("\n")
    if len(newline) != 1:
        raise ValueError("prevent_newline_after_colon: the tokenizer has no single-token newline")
    colons = {i for i in range(engine.vocab) if tok.detokenize([i]).endswith(":")}
    return newline[0], colons


def _max_prob_printer(engine):
    """print_max_prob: once per model replica (tp rank 0 of each stage prints its own exits)."""
    if engine.state.tp_rank != 0:
        return None
    detok = engine.tokenizer.detokenize

    def report(layer: int, tokens: torch.Tensor, probs: torch.Tensor) -> None:
        shown = ", ".join(f"[{detok([int(t)])!r}] {float(p):.4f}" for t, p in zip(tokens, probs))
        print(f"layer [{layer}]: {shown}", flush=True)

    return report


def _generator(engine, sampling) -> torch.Generator:
    generator = torch.Generator(device=engine.device)
    generator.manual_seed(engine.agree_seed(sampling.random_seed))
    return generator


def _runner(engine, sampling, ee_params, prompts: list[list[int]], max_len: int) -> tuple[StageRunner, ExitPolicy]:
    policy = ExitPolicy(ee_params, engine.ee_config, engine.num_layers)
    method = resolve_method(ee_params, engine.state.pp)
    generator = _generator(engine, sampling)
    printer = _max_prob_printer(engine) if ee_params.print_max_prob else None
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=engine.device)
    picker = TokenPicker(policy, sampling, generator, engine.vocab, newline_ban=_newline_ban(engine, sampling),
                         report=printer, lags=lengths - lengths.min())
    return StageRunner(engine, len(prompts), max_len, method, picker), policy


def generate_tokens(engine, prompts: list[list[int]], sampling, ee_params, observer=None) -> Decoded:
    """Token-level generation on every rank (same arguments everywhere); returns stage 0's result on
    every stage. ``observer(runner, header)`` sees each stage's cache after every step (tests)."""
    check_sampling(sampling)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: every prompt needs at least one token (set add_BOS for empty prompts)")
    stop_ids = _stop_ids(engine, sampling)
    max_len = max(len(p) for p in prompts) + max(sampling.tokens_to_generate, 0)
    _check_positions(engine.config, max_len)
    mode = resolve_decoding(ee_params)
    if mode == "early_exit" and not ee_params.use_early_exit:
        ee_params = replace(ee_params, use_early_exit=True)
    if sampling.beam_width is not None:
        if mode == "speculative":
            raise ValueError("beam_width: beam search runs at full depth; use decoding 'full'")
        return _beam(engine, prompts, sampling, ee_params, stop_ids, max_len, observer)
    if mode == "speculative" and sampling.tokens_to_generate > 0:
        return _speculative(engine, prompts, sampling, ee_params, stop_ids, max_len, observer)
    runner, policy = _runner(engine, sampling, ee_params, prompts, max_len)
    runner.observer = observer
    if not engine.is_first:
        runner.serve()
        return engine.broadcast_from_first(None)
    if sampling.tokens_to_generate == 0:
        lp = score_loop(runner, prompts)
        out = Decoded([[] for _ in prompts], [[] for _ in prompts], [[] for _ in prompts], prompt_logprobs=lp)
    else:
        stop_check = _stop_sequence_check(engine, sampling)
        out = decode_loop(runner, prompts, sampling, stop_ids=stop_ids, stop_check=stop_check,
                          recompute_cap=ee_params.recompute_cap if policy.enabled else None)
    return engine.broadcast_from_first(out)


def _check_positions(cfg, max_len: int) -> None:
    if cfg.position_embedding_type != "learned_absolute":
        return
    limit = cfg.max_position_embeddings or cfg.seq_length
    if max_len > limit:
        raise ValueError(f"prompts: the longest prompt plus tokens_to_generate is {max_len} tokens, more than the "
                         f"model's {limit} learned positions; shorten the prompt or generate fewer tokens")


def _beam(engine, prompts, sampling, ee_params, stop_ids, max_len, observer) -> Decoded:
    if len(prompts) != 1:
        raise ValueError(f"beam_width: beam search takes exactly one prompt, got {len(prompts)}")
    if ee_params.use_early_exit:
        raise ValueError("beam_width: beam search runs at full depth; set use_early_exit to false")
    width = sampling.beam_width
    runner = StageRunner(engine, width, max_len, beam_k=min(2 * width, engine.vocab))
    runner.observer = observer
    if not engine.is_first:
        runner.serve()
        return engine.broadcast_from_first(None)
    beams, scores = beam_loop(runner, prompts[0], sampling, stop_ids)
    full = [[engine.num_layers] * len(b) for b in beams]
    return engine.broadcast_from_first(Decoded(beams, [[] for _ in beams], full, extra={"scores": scores}))


def _speculative(engine, prompts, sampling, ee_params, stop_ids, max_len, observer) -> Decoded:
    layer = draft_exit(ee_params, list(engine.ee_config.exit_layer_nums), engine.num_layers)
    runner = SpeculativeRunner(engine, len(prompts), max_len, layer, sampling, _generator(engine, sampling),
                               newline_ban=_newline_ban(engine, sampling))
    runner.observer = observer
    if not engine.is_first:
        runner.serve()
        return engine.broadcast_from_first(None)
    out = speculative_loop(runner, prompts, sampling, stop_ids=stop_ids,
                           stop_check=_stop_sequence_check(engine, sampling), k=ee_params.num_speculative_tokens,
                           num_layers=engine.num_layers)
    return engine.broadcast_from_first(out)


def _stop_sequence_check(engine, sampling):
    if not sampling.stop_sequences:
        return None
    detok = engine.tokenizer.detokenize
    return lambda i, ids: any(s in detok(ids) for s in sampling.stop_sequences)


def _text(tok, prompt: list[int], gen: list[int], stops: list[str]) -> str:
    """Detokenized prompt (when echoed) and generation, cut before the first stop sequence in the
    generated part."""
    prefix = tok.detokenize(prompt) if prompt else ""
    full = tok.detokenize(prompt + gen) if prompt + gen else ""
    generated = full[len(prefix):] if full.startswith(prefix) else (tok.detokenize(gen) if gen else "")
    hits = [generated.find(s) for s in stops if s in generated]
    return full[: len(full) - len(generated)] + (generated[: min(hits)] if hits else generated)


def generate(engine, request: GenerationRequest) -> GenerationResult:
    """Serve one request; call on every rank of the model. The result is returned on every rank."""
    start = time.perf_counter()
    sampling, tok = request.sampling, engine.tokenizer
    prompts = [tok.tokenize(p) for p in request.prompts]
    if sampling.add_BOS:
        prompts = [[tok.eod] + p for p in prompts]
    out = generate_tokens(engine, prompts, sampling, request.early_exit)
    stop_ids = _stop_ids(engine, sampling)
    if sampling.beam_width is not None:
        prompts = prompts * len(out.tokens)
    texts, segments, tokens, logprobs = [], [], [], []
    echo = sampling.echo_prompts or sampling.tokens_to_generate == 0
    for i, gen in enumerate(out.tokens):
        shown = gen[:-1] if gen and gen[-1] in stop_ids else gen
        texts.append(_text(tok, prompts[i] if echo else [], shown, sampling.stop_sequences))
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
    return GenerationResult(texts=texts, segments=segments, tokens=tokens, logprobs=logprobs if want_lp else None,
                            exit_layers=out.exit_layers, num_generated=sum(len(t) for t in out.tokens),
                            elapsed_s=time.perf_counter() - start, stats=stats)
