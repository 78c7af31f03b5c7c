"""Teacher-forced log-probabilities of token sequences through a chosen exit, or under an early-exit threshold.

:class:`ExitScorer` runs the model chunks held by this process in order (one chunk for pp = 1, or every
stage of a split model built in one process) through the model's inference forward without a KV cache
(:meth:`EarlyExitGPTModel.infer` with ``inference_params=None``: one causal pass over the sequence), and reads:
- the final head (default),
- one exit (``exit_layer=L``): the logits of exit L, i.e. the first L layers plus that exit's head (no
  layer after L runs),
- per position, the first exit whose confidence reaches ``threshold`` (else the final head), decided by
  the same :class:`~megatron.text_generation.exit_rule.ExitRule` as early-exit decoding. With KV
  recomputation every layer's cache equals the full forward's, so this is what early-exit decoding
  computes for a teacher-forced token: threshold scoring measures the quality of early-exit generation
  without sampling. An exit's logits are computed only where the measure or a chosen position needs them.

Under tensor parallelism every tp rank calls the scorer with the same tokens; logits are gathered to the
full vocabulary, so every rank gets the same numbers.
"""

from __future__ import annotations

import torch

from megatron.text_generation.exit_rule import ExitRule, ExitWalk

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
    rule = ExitRule(exits, allowed=exit_layers, measure=measure, threshold=1.0 if threshold is None else threshold)
    return sorted(rule.allowed)


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
        self.rule = None
        if threshold is not None:
            self.rule = ExitRule(self.ee.exit_layer_nums, allowed=exit_layers, measure=measure, threshold=threshold,
                                 temperature=self.ee.temperature if use_temperature else None)

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

    def views(self, tokens: torch.Tensor, exits, stop: int | None = None):
        """Run ``tokens`` ``[b, s]`` through layers ``1..stop`` (default: the whole model) computing
        ``exits``: -> (exit views ``{layer: HeadView}`` over every position, final head's view or None)."""
        views, h, out = {}, None, None
        stop = self.config.num_layers if stop is None else stop
        for m in self.chunks:
            if m.spec.layers and m.spec.layers[0] > stop:
                break
            out = m.infer(tokens if m.spec.has_embedding else None, hidden_states=h, inference_params=None,
                          layers=(0, stop), exits=exits)
            views.update(out.exits)
            h = out.hidden
        return views, out.final

    def forward(self, tokens: torch.Tensor):
        """Every exit, eagerly: -> (exit logits ``{layer: [b, s, vocab]}``, exit hidden ``{layer: [b, s, h]}``,
        final logits or None when ``exit_layer`` stopped early)."""
        views, final = self.views(tokens.to(self.state.device), self.ee.exit_layer_nums, self.exit_layer)
        logits = {layer: v.per_sequence(v.logits()) for layer, v in views.items()}
        hidden = {layer: v.per_sequence(v.hidden).float() for layer, v in views.items()}
        return logits, hidden, None if final is None else final.per_sequence(final.logits())

    def score(self, tokens: torch.Tensor) -> Scored:
        """Log-probs of the next token at every position of ``tokens`` ``[b, s]``."""
        tokens = tokens.to(self.state.device)
        layers = torch.full(tokens.shape, self.config.num_layers, dtype=torch.long, device=tokens.device)
        if self.exit_layer is not None:
            views, _ = self.views(tokens, [self.exit_layer], self.exit_layer)
            layers.fill_(self.exit_layer)
            view = views[self.exit_layer]
            return Scored(torch.log_softmax(view.per_sequence(view.logits()), dim=-1), layers)
        views, final = self.views(tokens, [] if self.rule is None else self.rule.computed)
        chosen = final.logits()
        if self.rule is not None:
            chosen = self._pick_exits(views, chosen, layers.view(-1))
        return Scored(torch.log_softmax(final.per_sequence(chosen), dim=-1), layers)

    def _pick_exits(self, views, final: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
        """Rows take the logits of the first allowed exit confident enough (``layers`` updated in place)."""
        walk = ExitWalk(self.rule, torch.zeros(final.shape[0], dtype=torch.bool, device=final.device))
        chosen = final
        for layer in sorted(views):
            fire = walk.visit(views[layer])
            if fire is None or not bool(fire.any()):
                continue
            chosen = torch.where(fire.unsqueeze(-1), views[layer].logits(), chosen)
            layers.masked_fill_(fire, layer)
        return chosen
