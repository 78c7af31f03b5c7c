"""Early-exit decisions and per-sequence token choice during one decoding step.

A :class:`Carry` travels down the pipeline with the hidden states: per sequence, whether its token is
decided (``exited``), the layer it left at, the token and its log-prob, and for the ``cosine`` measure the
hidden state at the last exit evaluated. :class:`TokenPicker` fills it: at each exit the confidence of
the exit's logits over the real vocabulary under the request's measure (``early_exit.confidence``: top-1
probability by default, EE-LLM's rule, or margin, entropy, CALM's cosine; see ``confidence.py``),
optionally with the exit's training temperature, is compared with the threshold, per sequence (EE-LLM
decided the whole batch from its last sequence). The threshold is constant, or with ``threshold_decay``
CALM's eq. (5) of the index of the token among the generated ones. Sequences that pass take their token
from these logits, the others go on, and the final head decides whatever is left.

``cosine`` compares an exit's hidden state with the one at the model's previous exit (whether or not that
exit may fire, as the evaluation scorer does); the previous exit may sit on an earlier pipeline stage, so
the state rides in the carry, and any tp/pp split takes the same decisions as one process.

The two decoding methods differ only in what the forward does when every sequence has decided:
- method A, KV recomputation (``RECOMPUTE``): the forward stops, deeper layers get no KV for this
  position, and the next step re-feeds every position since the last full-depth pass to back-fill it.
  ``recompute_cap`` bounds that window (EE-LLM's grew without limit): after that many skipping steps
  the next step runs every layer while still taking each token from its exit, so tokens never change;
- method B, pipeline-based (``PIPELINE``): no stage skips; the stage where every sequence has decided
  sends the tokens to stage 0 at once, which starts the next token while later stages finish this one.
"""

from __future__ import annotations

import math

import torch

from .confidence import check_measure, confidence, decayed_threshold
from .sampling import select_tokens, token_logprobs

__all__ = ["RECOMPUTE", "PIPELINE", "Carry", "ExitPolicy", "TokenPicker", "resolve_method"]

RECOMPUTE, PIPELINE = "recompute", "pipeline"


def resolve_method(ee_params, pp: int) -> str:
    """``auto`` -> pipeline-based when pp > 1, else KV recomputation."""
    method = ee_params.method
    if method == "auto":
        return PIPELINE if pp > 1 else RECOMPUTE
    if method not in (RECOMPUTE, PIPELINE):
        raise ValueError(f"early_exit.method must be 'auto', 'recompute' or 'pipeline', got {method!r}")
    return method


class Carry:
    """Per-sequence decisions of one step, and ``prev_hidden`` ``[b, h]`` (``cosine`` only; None before the
    step's first exit). Packs to float64 for the pipeline messages: ``[4 b]``, then with a ``hidden_size``
    a presence flag and the states ``[1 + b h]`` (float64 holds fp32/bf16 values exactly, so crossing a
    stage changes no confidence)."""

    def __init__(self, exited: torch.Tensor, exit_layer: torch.Tensor, token: torch.Tensor, logprob: torch.Tensor,
                 prev_hidden: torch.Tensor | None = None):
        self.exited, self.exit_layer, self.token, self.logprob = exited, exit_layer, token, logprob
        self.prev_hidden = prev_hidden

    @classmethod
    def start(cls, decided: torch.Tensor, prev_token: torch.Tensor) -> "Carry":
        """``decided``: sequences whose token is not needed this step (still in their prompt, or
        finished); ``prev_token``: the token fed last (for ``prevent_newline_after_colon``)."""
        b = decided.shape[0]
        return cls(decided.clone(), torch.zeros(b, dtype=torch.long, device=decided.device), prev_token.clone(),
                   torch.zeros(b, dtype=torch.float32, device=decided.device))

    @staticmethod
    def packed_len(b: int, hidden_size: int = 0) -> int:
        return 4 * b + (1 + b * hidden_size if hidden_size else 0)

    def pack(self, hidden_size: int = 0) -> torch.Tensor:
        """``hidden_size`` 0: the decisions only (reports to stage 0)."""
        parts = [self.exited.double(), self.exit_layer.double(), self.token.double(), self.logprob.double()]
        if hidden_size:
            device, b = self.exited.device, self.exited.shape[0]
            present = self.prev_hidden is not None
            states = self.prev_hidden.double().flatten() if present else \
                torch.zeros(b * hidden_size, dtype=torch.float64, device=device)
            parts += [torch.tensor([float(present)], dtype=torch.float64, device=device), states]
        return torch.cat(parts)

    @classmethod
    def unpack(cls, t: torch.Tensor, hidden_size: int = 0) -> "Carry":
        b = (t.numel() - (1 if hidden_size else 0)) // (4 + hidden_size)
        e, layer, tok, lp = t[: 4 * b].view(4, b)
        prev = None
        if hidden_size and t[4 * b] > 0.5:
            prev = t[4 * b + 1:].view(b, hidden_size).float()
        return cls(e > 0.5, layer.round().long(), tok.round().long(), lp.float(), prev)


class ExitPolicy:
    """Which exits may fire (``layers``: ``exit_layers``, [] = all), the confidence measure, the threshold
    (constant, or decaying with ``threshold_decay``) and the optional temperature. ``evaluated``: the exits
    a step looks at; under ``cosine`` also the exits below the last one that may fire, whose hidden
    states the next exit compares with."""

    def __init__(self, ee_params, ee_config, num_layers: int):
        exits = list(ee_config.exit_layer_nums)
        unknown = sorted(set(ee_params.exit_layers) - set(exits))
        if unknown:
            raise ValueError(f"early_exit.exit_layers {unknown} are not exits of this model (exits: {exits})")
        self.measure = check_measure(ee_params.confidence)
        self.needs_hidden = self.measure == "cosine"
        if not 0.0 <= ee_params.early_exit_thres <= 1.0:
            raise ValueError(f"early_exit_thres must lie in [0, 1], got {ee_params.early_exit_thres}")
        decay = ee_params.threshold_decay
        if decay is not None and not (math.isfinite(decay) and decay >= 0):
            raise ValueError(f"early_exit.threshold_decay must be a finite number >= 0 (CALM's decay temperature; "
                             f"None or 0 keeps the threshold constant), got {decay}")
        if ee_params.recompute_cap is not None and ee_params.recompute_cap < 1:
            raise ValueError(f"early_exit.recompute_cap must be >= 1 (or None), got {ee_params.recompute_cap}")
        self.enabled = ee_params.use_early_exit and bool(exits)
        self.layers = set(ee_params.exit_layers or exits)
        last = max(self.layers, default=0)
        self.evaluated = {e for e in exits if e <= last} if self.needs_hidden else set(self.layers)
        self.thres, self.decay = ee_params.early_exit_thres, float(decay or 0.0)
        self.ee_config, self.use_temperature = ee_config, ee_params.use_temperature
        self.num_layers = num_layers

    def confidence(self, layer: int, logits: torch.Tensor, prev_hidden: torch.Tensor | None = None,
                   hidden: torch.Tensor | None = None) -> torch.Tensor:
        temperature = self.ee_config.temperature(layer) if self.use_temperature else 1.0
        return confidence(self.measure, logits, prev_hidden=prev_hidden, hidden=hidden, temperature=temperature)

    def threshold(self, position: torch.Tensor, max_len: int) -> float | torch.Tensor:
        """The bar for each sequence's token; ``position`` ``[b]``: its index among the generated tokens,
        ``max_len``: ``tokens_to_generate``."""
        if not self.decay:
            return self.thres
        return decayed_threshold(self.thres, position, max_len, self.decay)


class TokenPicker:
    """Fills a :class:`Carry` from exit logits and final logits (``[b, n, V_padded]``; the last
    position decides). ``vocab``: ids at or above it (vocabulary padding) are never chosen. ``lags``
    ``[b]``: each prompt's length minus the shortest one's (step ``s`` generates token ``s - lag`` of a
    sequence; None: all equal), for the decaying threshold."""

    def __init__(self, policy: ExitPolicy, sampling, generator, vocab: int, *, newline_ban=None, report=None,
                 lags: torch.Tensor | None = None):
        self.policy, self.sampling, self.generator, self.vocab = policy, sampling, generator, vocab
        self.newline_ban = newline_ban  # (newline id, set of ids ending with ':') or None
        self.report = report  # print_max_prob callback(layer, tokens, probs) or None
        self.lags = lags
        self.carry: Carry | None = None
        self.step = 0

    def begin(self, carry: Carry, step: int) -> None:
        self.carry, self.step = carry, step

    def _logits(self, logits: torch.Tensor) -> torch.Tensor:
        x = logits[:, -1, : self.vocab].float()
        if self.newline_ban is not None:
            newline, colons = self.newline_ban
            after_colon = torch.tensor([int(t) in colons for t in self.carry.token], device=x.device)
            x[after_colon, newline] = float("-inf")
        return x

    def _take(self, rows: torch.Tensor, x: torch.Tensor, layer: int) -> None:
        if not bool(rows.any()):
            return
        tokens = select_tokens(x[rows], self.sampling, self.step, self.generator)
        c = self.carry
        c.token[rows], c.logprob[rows] = tokens, token_logprobs(x[rows], tokens)
        c.exit_layer[rows], c.exited[rows] = layer, True

    def _threshold(self, b: int, device) -> float | torch.Tensor:
        lags = self.lags if self.lags is not None else torch.zeros(b, dtype=torch.long, device=device)
        # sequences still in their prompt (negative index) are decided already; clamp keeps CALM's formula valid
        position = (self.step - lags.to(device)).clamp(min=0)
        return self.policy.threshold(position, self.sampling.tokens_to_generate)

    def decide(self, layer: int, logits: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Exit decider for :func:`megatron.model.inference.inference_forward` -> fires ``[b]``;
        ``hidden`` ``[b, h]``: the exit's last-position hidden state (needed by ``cosine``)."""
        b = logits.shape[0]
        fire = torch.zeros(b, dtype=torch.bool, device=logits.device)
        policy = self.policy
        if not policy.enabled or layer not in policy.evaluated:
            return fire
        prev = self.carry.prev_hidden
        if policy.needs_hidden:
            if hidden is None:
                raise ValueError("confidence 'cosine' needs the exits' hidden states: run the forward with "
                                 "exit_hidden=True")
            self.carry.prev_hidden = hidden
        if layer not in policy.layers:
            return fire
        x = self._logits(logits)
        conf = policy.confidence(layer, x, prev_hidden=prev, hidden=hidden)
        if self.report is not None:
            self.report(layer, x.argmax(-1), conf)
        fire = (conf >= self._threshold(b, x.device)) & ~self.carry.exited
        self._take(fire, x, layer)
        return fire

    def final(self, logits: torch.Tensor) -> None:
        x = self._logits(logits)
        if self.report is not None:
            self.report(self.policy.num_layers, x.argmax(-1), torch.softmax(x, dim=-1).max(dim=-1).values)
        self._take(~self.carry.exited, x, self.policy.num_layers)
