"""Early-exit decisions and per-sequence token choice during one decoding step.

A :class:`Carry` travels down the pipeline with the hidden states: per sequence, whether its token is
decided (``exited``), the layer it left at, the token and its log-prob. :class:`TokenPicker` fills it:
at each exit the confidence (``early_exit.confidence``, by default the top-1 softmax probability of the
exit's logits over the real vocabulary; see ``confidence.py``), optionally with the exit's training
temperature, is compared with the threshold, per sequence (EE-LLM
decided the whole batch from its last sequence); sequences that pass take their token from these
logits, the others go on, and the final head decides whatever is left.

The two decoding methods differ only in what the forward does when every sequence has decided:
- method A, KV recomputation (``RECOMPUTE``): the forward stops, deeper layers get no KV for this
  position, and the next step re-feeds every position since the last full-depth pass to back-fill it.
  ``recompute_cap`` bounds that window (EE-LLM's grew without limit): after that many skipping steps
  the next step runs every layer while still taking each token from its exit, so tokens never change;
- method B, pipeline-based (``PIPELINE``): no stage skips; the stage where every sequence has decided
  sends the tokens to stage 0 at once, which starts the next token while later stages finish this one.
"""

from __future__ import annotations

import torch

from .confidence import check_measure, confidence
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
    """Per-sequence decisions of one step; packs to float64 ``[4 b]`` for the pipeline messages."""

    def __init__(self, exited: torch.Tensor, exit_layer: torch.Tensor, token: torch.Tensor, logprob: torch.Tensor):
        self.exited, self.exit_layer, self.token, self.logprob = exited, exit_layer, token, logprob

    @classmethod
    def start(cls, decided: torch.Tensor, prev_token: torch.Tensor) -> "Carry":
        """``decided``: sequences whose token is not needed this step (still in their prompt, or
        finished); ``prev_token``: the token fed last (for ``prevent_newline_after_colon``)."""
        b = decided.shape[0]
        return cls(decided.clone(), torch.zeros(b, dtype=torch.long, device=decided.device), prev_token.clone(),
                   torch.zeros(b, dtype=torch.float32, device=decided.device))

    def pack(self) -> torch.Tensor:
        return torch.cat([self.exited.double(), self.exit_layer.double(), self.token.double(), self.logprob.double()])

    @classmethod
    def unpack(cls, t: torch.Tensor) -> "Carry":
        e, layer, tok, lp = t.view(4, -1)
        return cls(e > 0.5, layer.round().long(), tok.round().long(), lp.float())


class ExitPolicy:
    """Which exits may fire (``exit_layers``; [] = all), the threshold and the optional temperature."""

    def __init__(self, ee_params, ee_config, num_layers: int):
        exits = list(ee_config.exit_layer_nums)
        unknown = sorted(set(ee_params.exit_layers) - set(exits))
        if unknown:
            raise ValueError(f"early_exit.exit_layers {unknown} are not exits of this model (exits: {exits})")
        self.measure = check_measure(ee_params.confidence)
        if self.measure == "cosine":
            raise ValueError("early_exit.confidence 'cosine' needs the exits' hidden states, which this decoder "
                             "does not carry; use 'top1', 'margin' or 'entropy'")
        if not 0.0 <= ee_params.early_exit_thres <= 1.0:
            raise ValueError(f"early_exit_thres must lie in [0, 1], got {ee_params.early_exit_thres}")
        if ee_params.recompute_cap is not None and ee_params.recompute_cap < 1:
            raise ValueError(f"early_exit.recompute_cap must be >= 1 (or None), got {ee_params.recompute_cap}")
        self.enabled = ee_params.use_early_exit and bool(exits)
        self.layers = set(ee_params.exit_layers or exits)
        self.thres = ee_params.early_exit_thres
        self.ee_config, self.use_temperature = ee_config, ee_params.use_temperature
        self.num_layers = num_layers

    def confidence(self, layer: int, logits: torch.Tensor) -> torch.Tensor:
        temperature = self.ee_config.temperature(layer) if self.use_temperature else 1.0
        return confidence(self.measure, logits, temperature=temperature)


class TokenPicker:
    """Fills a :class:`Carry` from exit logits and final logits (``[b, n, V_padded]``; the last
    position decides). ``vocab``: ids at or above it (vocabulary padding) are never chosen."""

    def __init__(self, policy: ExitPolicy, sampling, generator, vocab: int, *, newline_ban=None, report=None):
        self.policy, self.sampling, self.generator, self.vocab = policy, sampling, generator, vocab
        self.newline_ban = newline_ban  # (newline id, set of ids ending with ':') or None
        self.report = report  # print_max_prob callback(layer, tokens, probs) or None
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

    def decide(self, layer: int, logits: torch.Tensor) -> torch.Tensor:
        """Exit decider for :func:`megatron.model.inference.inference_forward` -> fires ``[b]``."""
        b = logits.shape[0]
        fire = torch.zeros(b, dtype=torch.bool, device=logits.device)
        if not self.policy.enabled or layer not in self.policy.layers:
            return fire
        x = self._logits(logits)
        conf = self.policy.confidence(layer, x)
        if self.report is not None:
            self.report(layer, x.argmax(-1), conf)
        fire = (conf >= self.policy.thres) & ~self.carry.exited
        self._take(fire, x, layer)
        return fire

    def final(self, logits: torch.Tensor) -> None:
        x = self._logits(logits)
        if self.report is not None:
            self.report(self.policy.num_layers, x.argmax(-1), torch.softmax(x, dim=-1).max(dim=-1).values)
        self._take(~self.carry.exited, x, self.policy.num_layers)
