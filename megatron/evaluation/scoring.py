"""Teacher-forced log-probabilities of token sequences through a chosen exit, or under an early-exit threshold.

:class:`ExitScorer` runs the model chunks held by this process in order (one chunk for pp = 1, or every
stage of a split model built in one process) with the plain full-sequence forward, and reads:
- the final head (default),
- one exit (``exit_layer=L``): the logits of exit L, i.e. the first L layers plus that exit's head (the
  chunks after the one owning exit L are not run),
- per position, the first exit whose confidence reaches ``threshold`` (else the final head). With KV
  recomputation every layer's cache equals the full forward's, so this is what early-exit decoding computes
  for a teacher-forced token: threshold scoring measures the quality of early-exit generation without
  sampling.

Under tensor parallelism every tp rank calls the scorer with the same tokens; logits are gathered to the
full vocabulary, so every rank gets the same numbers.
"""

from __future__ import annotations

import torch

from megatron.model.exit_heads import full_vocab_logits, lm_logits
from megatron.text_generation.confidence import check_measure, confidence

__all__ = ["ExitScorer", "Scored", "check_selection"]


def check_selection(ee, exit_layer: int | None, threshold: float | None, measure: str, exit_layers) -> list[int]:
    """Check what is to be evaluated against the model's exits (``ee``: its EarlyExitConfig); -> the exits
    that may fire under a threshold."""
    exits = list(ee.exit_layer_nums)
    if exit_layer is not None and threshold is not None:
        raise ValueError("exit_layer and early_exit_thres exclude each other: evaluate one exit, or early exits "
                         "under a threshold")
    if exit_layer is not None and exit_layer not in exits:
        raise ValueError(f"exit_layer {exit_layer} is not an exit of this model (exits: {exits}); pick one of "
                         "--exit-layer-nums")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"early_exit_thres must lie in [0, 1], got {threshold}")
    check_measure(measure)
    unknown = sorted(set(exit_layers or []) - set(exits))
    if unknown:
        raise ValueError(f"exit_layers {unknown} are not exits of this model (exits: {exits})")
    return sorted(exit_layers or exits)


class Scored:
    """Per-position log-probs ``[b, s, vocab]`` (real vocabulary) and the layer each position left at ``[b, s]``."""

    def __init__(self, logprobs: torch.Tensor, exit_layer: torch.Tensor):
        self.logprobs, self.exit_layer = logprobs, exit_layer


class ExitScorer:
    """``chunks``: this process's model chunks, in model order, covering the whole model (embedding in the
    first, head in the last). ``exit_layer`` and ``threshold`` exclude each other; ``measure`` and
    ``use_temperature`` (divide exit logits by ``--exit-layer-temperature``) apply to ``threshold``;
    ``exit_layers`` restricts which exits may fire under a threshold ([] / None: all)."""

    def __init__(self, chunks, *, exit_layer: int | None = None, threshold: float | None = None,
                 measure: str = "top1", use_temperature: bool = False, exit_layers=None):
        self.chunks = list(chunks) if isinstance(chunks, (list, tuple)) else [chunks]
        self._check_chunks()
        first = self.chunks[0]
        self.config, self.ee, self.state = first.config, first.ee, first.state
        self.allowed = check_selection(self.ee, exit_layer, threshold, measure, exit_layers)
        self.exit_layer, self.threshold = exit_layer, threshold
        self.measure, self.use_temperature = measure, use_temperature

    def _check_chunks(self) -> None:
        specs = [m.spec for m in self.chunks]
        layers = [layer for s in specs for layer in s.layers]
        if not specs[0].has_embedding or not specs[-1].has_head or layers != list(range(1, len(layers) + 1)):
            raise ValueError("scoring needs every layer of the model in this process, in order (pp = 1, or all "
                             "pipeline stages built in one process); generate_until works under any pp")
        if any(m.sequence_parallel for m in self.chunks):
            raise ValueError("build the evaluation model with --sequence-parallel off")

    @property
    def vocab(self) -> int:
        return self.config.vocab_size

    def _logits(self, h: torch.Tensor, weight) -> torch.Tensor:
        return full_vocab_logits(lm_logits(h, weight, self.state.tp_group, False), self.state.tp_group)[..., :self.vocab]

    def forward(self, tokens: torch.Tensor) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], torch.Tensor | None]:
        """-> (exit logits ``{layer: [b, s, vocab]}``, exit hidden ``{layer: [b, s, h]}``, final logits or
        None when ``exit_layer`` stopped early)."""
        logits, hidden, h = {}, {}, None
        with torch.no_grad():
            for m in self.chunks:
                h, _, rope = m.stage_input(tokens if m.spec.has_embedding else None, None, h)
                h, exit_hidden = m.language_model.encoder(h, None, rope)
                for layer, h_exit in exit_hidden.items():
                    logits[layer] = self._logits(h_exit, m.exit_weight(layer)).float()
                    hidden[layer] = h_exit.transpose(0, 1).float()
                if self.exit_layer is not None and self.exit_layer in logits:
                    return logits, hidden, None
            return logits, hidden, self._logits(h, m.output_weight()).float()

    def score(self, tokens: torch.Tensor) -> Scored:
        """Log-probs of the next token at every position of ``tokens`` ``[b, s]``."""
        tokens = tokens.to(self.state.device)
        logits, hidden, final = self.forward(tokens)
        layers = torch.full(tokens.shape, self.config.num_layers, dtype=torch.long, device=tokens.device)
        if self.exit_layer is not None:
            layers.fill_(self.exit_layer)
            return Scored(torch.log_softmax(logits[self.exit_layer], dim=-1), layers)
        chosen = final.clone()
        if self.threshold is not None:
            self._pick_exits(logits, hidden, chosen, layers)
        return Scored(torch.log_softmax(chosen, dim=-1), layers)

    def _pick_exits(self, logits, hidden, chosen: torch.Tensor, layers: torch.Tensor) -> None:
        """Positions take the logits of the first allowed exit that is confident enough (in place)."""
        b, s, v = chosen.shape
        decided = torch.zeros(b * s, dtype=torch.bool, device=chosen.device)
        prev = None
        for layer in sorted(logits):
            cur = hidden[layer].reshape(b * s, -1)
            if layer in self.allowed:
                temp = self.ee.temperature(layer) if self.use_temperature else 1.0
                conf = confidence(self.measure, logits[layer].reshape(b * s, v), prev_hidden=prev, hidden=cur,
                                  temperature=temp)
                fire = (conf >= self.threshold) & ~decided
                chosen.view(b * s, v)[fire] = logits[layer].reshape(b * s, v)[fire]
                layers.view(-1)[fire] = layer
                decided |= fire
            prev = cur
