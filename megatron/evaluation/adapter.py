"""An lm-evaluation-harness ``LM`` over our model: ``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``.

When the ``lm_eval`` package is installed, :class:`EarlyExitLM` subclasses ``lm_eval.api.model.LM`` and
can be handed to ``lm_eval.simple_evaluate(model=...)``; without it (lm-eval pulls ~60 packages, among
them datasets, pandas and scikit-learn) the class has the same three methods and reads any request
object with an ``args`` tuple (lm-eval's ``Instance``, our :class:`Request`) or a plain tuple, which is
what the local task runner (``python -m megatron.evaluation``) uses.

What is evaluated:
- default: the full model;
- ``exit_layer=L``: the first L layers plus exit L's head. Log-likelihoods read that exit's logits;
  ``generate_until`` generates with every token leaving at exit L (early exit at threshold 0 restricted
  to that exit, which is the truncated model's decoding);
- ``early_exit_thres=t``: early exit under the threshold (confidence ``measure``, see
  ``megatron.text_generation.confidence``): ``generate_until`` decodes with early exits, log-likelihoods
  take each position's logits from the first exit confident enough (see :mod:`.scoring`).

Log-likelihoods need every layer in this process (pp = 1; any tp, all tp ranks calling alike);
``generate_until`` runs through ``megatron.text_generation.generation.generate`` and so works under any
tp and pp, every rank of the model calling it with the same requests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from megatron.text_generation.request import EarlyExitParams, GenerationRequest, SamplingParams

from .scoring import ExitScorer, check_selection

__all__ = ["EarlyExitLM", "Request", "HAVE_LM_EVAL", "make_generate_fn", "run_lm_eval"]

try:  # optional: only needed to run lm-eval's own tasks
    from lm_eval.api.model import LM as _LMBase

    HAVE_LM_EVAL = True
except ImportError:
    HAVE_LM_EVAL = False

    class _LMBase:  # the part of lm-eval's LM the harness reads besides the three methods
        def __init__(self) -> None:
            self._rank, self._world_size = 0, 1

        @property
        def rank(self) -> int:
            return self._rank

        @property
        def world_size(self) -> int:
            return self._world_size


@dataclass
class Request:
    """A request as lm-eval's ``Instance`` presents it to an ``LM``: its arguments tuple."""

    args: tuple


def _args(request) -> tuple:
    return tuple(request.args) if hasattr(request, "args") else tuple(request)


def make_generate_fn(chunks, state, tokenizer, model_config, ee_config):
    """``request -> GenerationResult`` through :func:`megatron.text_generation.generation.generate`."""
    from megatron.text_generation.engine import InferenceEngine
    from megatron.text_generation.generation import generate

    engine = InferenceEngine(chunks, state, tokenizer, model_config, ee_config)
    return lambda request: generate(engine, request)


GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p", "seed")


class EarlyExitLM(_LMBase):
    """``chunks``/``state``/``tokenizer``/``model_config``/``ee_config``: this rank's model as built for
    inference (see module doc for ``exit_layer``, ``early_exit_thres``, ``confidence``). ``max_length``:
    longest scored window (default: the model's positions). ``generate_fn(request) -> GenerationResult``
    replaces the default ``generate`` over an :class:`InferenceEngine` of ``chunks``."""

    def __init__(self, chunks, state, tokenizer, model_config, ee_config, *, exit_layer: int | None = None,
                 early_exit_thres: float | None = None, confidence: str = "top1", use_temperature: bool = False,
                 exit_layers=None, batch_size: int = 8, max_length: int | None = None, max_gen_toks: int = 256,
                 generate_fn=None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.chunks = list(chunks) if isinstance(chunks, (list, tuple)) else [chunks]
        self.state, self.tokenizer = state, tokenizer
        self.model_config, self.ee_config = model_config, ee_config
        self.exit_layer, self.threshold, self.measure = exit_layer, early_exit_thres, confidence
        self.use_temperature, self.exit_layers = use_temperature, list(exit_layers or [])
        self.batch_size, self.max_gen_toks = batch_size, max_gen_toks
        self.max_length = max_length or model_config.max_position_embeddings or model_config.seq_length
        check_selection(ee_config, exit_layer, early_exit_thres, confidence, self.exit_layers)
        self._scorer_args = dict(exit_layer=exit_layer, threshold=early_exit_thres, measure=confidence,
                                 use_temperature=use_temperature, exit_layers=self.exit_layers)
        self._scorer = None
        self._generate_fn = generate_fn
        self.reset_stats()

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        """What an empty context and every rolling window start from: eod, else bos."""
        for token in (self.tokenizer.eod, self.tokenizer.bos):
            if token is not None and token >= 0:
                return token
        raise ValueError(f"{type(self.tokenizer).__name__} has neither an eod nor a bos token: empty contexts and "
                         "loglikelihood_rolling need one to start from")

    def tok_encode(self, text: str) -> list[int]:
        return list(self.tokenizer.tokenize(text)) if text else []

    def tok_decode(self, ids) -> str:
        return self.tokenizer.detokenize(list(ids)) if len(ids) else ""

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's rule: trailing spaces of the context belong to the continuation, and the
        continuation's tokens are those of ``context + continuation`` after the context's."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx = self.tok_encode(context) if context else [self.eot_token_id]
        whole = self.tok_encode(context + continuation) if context else ctx + self.tok_encode(continuation)
        if whole[: len(ctx)] != ctx:  # the tokenizer merged across the boundary: keep the two apart
            return ctx, self.tok_encode(continuation)
        return ctx, whole[len(ctx):]

    # ------------------------------------------------------------------ scoring
    @property
    def scorer(self) -> ExitScorer:
        if self._scorer is None:
            self._scorer = ExitScorer(self.chunks, **self._scorer_args)
        return self._scorer

    def reset_stats(self) -> None:
        self._layers = {"scored": [0, 0], "generated": [0, 0]}  # kind -> [tokens, sum of exit layers]

    def _count(self, kind: str, layers) -> None:
        self._layers[kind][0] += len(layers)
        self._layers[kind][1] += int(sum(layers))

    def stats(self) -> dict:
        """Average layer the scored and the generated tokens left at since :meth:`reset_stats` (full
        depth = ``num_layers``; None when there were none)."""
        return {f"mean_{kind}_exit_layer": (total / n if n else None) for kind, (n, total) in self._layers.items()}

    def _score_windows(self, windows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """``(seq, k)``: feed ``seq[:-1]``, score the last ``k`` targets of ``seq[1:]`` -> (sum of
        log-probs, whether each target is the argmax)."""
        results: list[tuple[float, bool] | None] = [None] * len(windows)
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
        for lo in range(0, len(order), self.batch_size):
            batch = order[lo: lo + self.batch_size]
            width = max(len(windows[i][0]) - 1 for i in batch)
            tokens = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):  # right padding: causal attention keeps it out of real positions
                seq = windows[i][0]
                tokens[row, : len(seq) - 1] = torch.tensor(seq[:-1])
            scored = self.scorer.score(tokens)
            for row, i in enumerate(batch):
                seq, k = windows[i]
                n = len(seq) - 1
                target = torch.tensor(seq[n - k + 1:], device=scored.logprobs.device)
                lp = scored.logprobs[row, n - k: n]
                total = float(lp.gather(-1, target.unsqueeze(-1)).sum())
                results[i] = (total, bool((lp.argmax(-1) == target).all()))
                self._count("scored", scored.exit_layer[row, n - k: n].tolist())
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Per ``(context, continuation)``: (log-prob of the continuation, whether greedy decoding from
        the context would produce it). The context is cut from the left to fit ``max_length``."""
        windows = []
        for req in requests:
            ctx, cont = self._encode_pair(*_args(req))
            if not cont:
                raise ValueError(f"loglikelihood: the continuation of {_args(req)!r} has no tokens")
            seq = (ctx + cont)[-(self.max_length + 1):]
            windows.append((seq, min(len(cont), len(seq) - 1)))
        return self._score_windows(windows)

    def rolling_windows(self, ids: list[int]) -> list[tuple[list[int], int]]:
        """Every token of ``ids`` scored once, after the end-of-text token, each window predicting up to
        ``max_length`` tokens with as much context as fits (lm-eval's rolling windows)."""
        seq = [self.eot_token_id] + list(ids)
        windows = []
        for j0 in range(1, len(seq), self.max_length):
            j1 = min(j0 + self.max_length, len(seq))
            windows.append((seq[max(0, j1 - 1 - self.max_length): j1], j1 - j0))
        return windows

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Per ``(text,)``: the log-probability of the whole text (for perplexity)."""
        out = []
        for req in requests:
            (text,) = _args(req)[:1]
            windows = self.rolling_windows(self.tok_encode(text))
            out.append(sum(lp for lp, _ in self._score_windows(windows)))
        return out

    # ------------------------------------------------------------------ generation
    def early_exit_params(self) -> EarlyExitParams:
        """The request's early-exit settings: exit L at threshold 0 makes every token leave at L whatever
        its confidence (so the measure does not matter there)."""
        if self.exit_layer is not None:
            return EarlyExitParams(use_early_exit=True, early_exit_thres=0.0, exit_layers=[self.exit_layer])
        if self.threshold is not None:
            return EarlyExitParams(use_early_exit=True, early_exit_thres=self.threshold, exit_layers=self.exit_layers,
                                   use_temperature=self.use_temperature, confidence=self.measure)
        return EarlyExitParams()

    def sampling_params(self, gen_kwargs: dict) -> SamplingParams:
        unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
        if unknown:
            raise ValueError(f"generate_until: gen_kwargs {unknown} are not supported; use {', '.join(GEN_KWARGS)}")
        until = gen_kwargs.get("until", [])
        until = [until] if isinstance(until, str) else list(until)
        sample = bool(gen_kwargs.get("do_sample", False))
        return SamplingParams(tokens_to_generate=int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)),
                              greedy=not sample, temperature=float(gen_kwargs.get("temperature", 1.0) or 1.0),
                              top_k=int(gen_kwargs.get("top_k", 0) or 0) if sample else 0,
                              top_p=float(gen_kwargs.get("top_p", 0.0) or 0.0) if sample else 0.0,
                              random_seed=gen_kwargs.get("seed"), stop_sequences=until)

    def _fit_context(self, context: str, budget: int) -> str:
        ids = self.tok_encode(context)
        room = self.max_length - budget
        if room < 1:
            raise ValueError(f"generate_until: max_gen_toks {budget} leaves no room for the context in "
                             f"max_length {self.max_length}")
        return context if len(ids) <= room else self.tok_decode(ids[-room:])

    def generate(self, request: GenerationRequest):
        """One :class:`GenerationRequest` through ``generate_fn`` (every rank of the model must call)."""
        if self._generate_fn is None:
            self._generate_fn = make_generate_fn(self.chunks, self.state, self.tokenizer, self.model_config,
                                                 self.ee_config)
        return self._generate_fn(request)

    def generate_until(self, requests) -> list[str]:
        """Per ``(context, gen_kwargs)``: the continuation, cut before the first ``until`` string. Requests
        with equal ``gen_kwargs`` share batches."""
        groups: dict[str, list[int]] = {}
        items = [_args(r) for r in requests]
        for i, (_, kwargs) in enumerate(items):
            groups.setdefault(json.dumps(kwargs, sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(items)
        for idx in groups.values():
            sampling = self.sampling_params(items[idx[0]][1])
            for lo in range(0, len(idx), self.batch_size):
                batch = idx[lo: lo + self.batch_size]
                prompts = [self._fit_context(items[i][0], sampling.tokens_to_generate) for i in batch]
                result = self.generate(GenerationRequest(prompts, sampling, self.early_exit_params()))
                for i, text, layers in zip(batch, result.texts, result.exit_layers):
                    out[i] = _cut(text, sampling.stop_sequences)
                    self._count("generated", layers)
        return out


def run_lm_eval(lm: EarlyExitLM, tasks: list[str], **kwargs) -> dict:
    """lm-eval's own tasks (names, or task objects built from local YAML / data files) on ``lm`` through
    ``lm_eval.simple_evaluate``; needs the ``lm_eval`` package."""
    if not HAVE_LM_EVAL:
        raise ValueError("--lm-eval-task needs the lm-eval package (pip install lm-eval); the local task files "
                         "(--task) run without it")
    import lm_eval

    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), **kwargs)


def _cut(text: str, stops: list[str]) -> str:
    hits = [text.find(s) for s in stops if s and s in text]
    return text[: min(hits)] if hits else text
