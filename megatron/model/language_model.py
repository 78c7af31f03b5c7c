"""The embedding, the stack of transformer layers of one (stage, chunk), and their container.

Module names mirror Megatron / EE-LLM state-dict keys: ``language_model.embedding.word_embeddings``,
``.position_embeddings``, ``language_model.encoder.layers.<local i>``, ``language_model.encoder.final_norm``,
``language_model.output_layer``, ``language_model.exit_output_layer.<local k>``.

Activation recompute (``--recompute-granularity full``) wraps groups of layers, exit layers and their exit
heads included (EE-LLM silently skipped it there): ``uniform`` checkpoints consecutive groups of
``--recompute-num-layers`` layers, ``block`` checkpoints each of the first ``--recompute-num-layers``
layers of the chunk. The recompute replays the RNG streams, so dropout masks match the first forward.

EE-Tuning (:meth:`TransformerEncoder.run` with ``frozen``): the backbone layers run under ``torch.no_grad``
(no autograd graph for them at all, so nothing to recompute: recompute is off) and only the exit parts
build one; ``stop_after_exits`` ends the loop after the chunk's last exit layer (no later layer, no final
norm), which is all a tuning stream whose forward ends here needs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    checkpoint,
    scatter_to_sequence_parallel_region,
)
from megatron.core.tensor_parallel.range_checks import check_index_range
from megatron.core.transformer import InitScope, TransformerLayer, build_norm

from .exit_heads import EarlyExitTransformerLayer

__all__ = ["Embedding", "TransformerEncoder", "EncoderOutput", "LanguageModel", "output_projection"]


@dataclass
class EncoderOutput:
    """``hidden``: the chunk's output ``[s(/tp), b, h]`` (None when the loop stopped after the last exit).
    ``exit_hidden``: each exit's pre-projection hidden state. ``exit_trunk``: each exit layer's trunk state
    (the estimator's input, detached: see :meth:`EarlyExitTransformerLayer.trunk_state`)."""

    hidden: torch.Tensor | None
    exit_hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    exit_trunk: dict[int, torch.Tensor] = field(default_factory=dict)


def output_projection(config, state, vocab: int, recipe, layer: int, name: str) -> ColumnParallelLinear:
    """A ``[V/tp, h]`` projection without bias, seeded by ``(layer, name)``."""
    init = None if recipe is None else recipe.normal(layer, name)
    return ColumnParallelLinear(config.hidden_size, vocab, state=state, bias=False, init_method=init,
                                params_dtype=config.params_dtype)


class Embedding(nn.Module):
    def __init__(self, config, *, state, vocab: int, recipe, rng_tracker=None):
        super().__init__()
        scope = InitScope(recipe, 0, "embedding.")
        self.word_embeddings = VocabParallelEmbedding(
            vocab, config.hidden_size, state=state, init_method=scope.normal("word_embeddings.weight"),
            params_dtype=config.params_dtype)
        self.position_embeddings = None
        if config.position_embedding_type == "learned_absolute":
            full = torch.zeros(config.max_positions, config.hidden_size, device=state.device)
            fill = scope.normal("position_embeddings.weight")
            if fill is not None:
                fill(full)
            self.position_embeddings = nn.Embedding(config.max_positions, config.hidden_size,
                                                    device=state.device, dtype=config.params_dtype)
            with torch.no_grad():
                self.position_embeddings.weight.copy_(full)
        self.dropout = config.hidden_dropout
        self.group = state.tp_group
        self.sequence_parallel = config.sequence_parallel and state.tp > 1
        self.rng_tracker = rng_tracker

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """``[b, s]`` ids -> ``[s(/tp), b, h]``."""
        e = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            check_index_range(position_ids, self.position_embeddings.num_embeddings, "position ids",
                              "raise --max-position-embeddings or shorten the sequence")
            e = e + self.position_embeddings(position_ids)
        e = e.transpose(0, 1).contiguous()
        ctx = contextlib.nullcontext()
        if self.sequence_parallel:
            e = scatter_to_sequence_parallel_region(e, self.group)
            if self.rng_tracker is not None:
                ctx = self.rng_tracker.fork()
        with ctx:
            return F.dropout(e, self.dropout, training=self.training)


class TransformerEncoder(nn.Module):
    def __init__(self, config, ee, *, state, spec, recipe, rng_tracker=None):
        super().__init__()
        layers = []
        for number in spec.layers:
            if number in spec.exits:
                layers.append(EarlyExitTransformerLayer(
                    config, ee, state=state, layer_number=number, recipe=recipe, rng_tracker=rng_tracker))
            else:
                layers.append(TransformerLayer(
                    config, state=state, layer_number=number, init=InitScope(recipe, number), rng_tracker=rng_tracker))
        self.layers = nn.ModuleList(layers)
        self.final_norm = build_norm(config, state.device) if spec.has_head else None
        self.recompute = config.recompute_granularity == "full"
        self.recompute_method = config.recompute_method
        self.recompute_num_layers = config.recompute_num_layers
        self.rng_tracker = rng_tracker

    def layer_groups(self, n: int | None = None, frozen: bool = False) -> list[tuple[range, bool]]:
        """Consecutive ranges of the first ``n`` (default: all) local layers and whether each is recomputed
        in backward."""
        n = len(self.layers) if n is None else n
        if frozen or not (self.recompute and self.training and torch.is_grad_enabled()):
            return [(range(n), False)] if n else []
        k = self.recompute_num_layers
        if self.recompute_method == "uniform":
            return [(range(i, min(i + k, n)), True) for i in range(0, n, k)]
        groups = [(range(i, i + 1), True) for i in range(min(k, n))]
        return groups + ([(range(k, n), False)] if k < n else [])

    def _run(self, idxs: range, attention_mask, rope, frozen: bool, h: torch.Tensor):
        """-> ``(output, exit hidden..., trunk state...)`` of the exit layers among ``idxs``, in order."""
        exit_hs, trunks = [], []
        for i in idxs:
            layer = self.layers[i]
            if isinstance(layer, EarlyExitTransformerLayer):
                x = h
                h, h_exit = layer(h, attention_mask, rope, frozen=frozen)
                exit_hs.append(h_exit)
                trunks.append(layer.trunk_state(x, h))
            else:
                with torch.no_grad() if frozen else contextlib.nullcontext():
                    h = layer(h, attention_mask, rope)
        return (h, *exit_hs, *trunks)

    def run(self, h, attention_mask=None, rope=None, *, frozen: bool = False,
            stop_after_exits: bool = False) -> EncoderOutput:
        """Training / full-sequence forward (see the module docstring for ``frozen`` and
        ``stop_after_exits``)."""
        out = EncoderOutput(None)
        n = len(self.layers)
        if stop_after_exits:
            exit_idx = [i for i, layer in enumerate(self.layers) if isinstance(layer, EarlyExitTransformerLayer)]
            if not exit_idx:
                raise ValueError("stop_after_exits needs a chunk holding an exit")
            n = exit_idx[-1] + 1
        for idxs, recompute in self.layer_groups(n, frozen):
            run = partial(self._run, idxs, attention_mask, rope, frozen)
            if recompute:
                params = [p for i in idxs for p in self.layers[i].parameters()]
                outs = checkpoint(run, h, tracker=self.rng_tracker, params=params)
            else:
                outs = run(h)
            outs = (outs,) if torch.is_tensor(outs) else outs
            h = outs[0]
            numbers = [self.layers[i].layer_number for i in idxs
                       if isinstance(self.layers[i], EarlyExitTransformerLayer)]
            out.exit_hidden.update(zip(numbers, outs[1:1 + len(numbers)]))
            out.exit_trunk.update((k, t.detach()) for k, t in zip(numbers, outs[1 + len(numbers):]))
        if stop_after_exits:
            return out
        if self.final_norm is not None:
            with torch.no_grad() if frozen else contextlib.nullcontext():
                h = self.final_norm(h)
        out.hidden = h
        return out

    def forward(self, h, attention_mask=None, rope=None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Training / full-sequence forward: -> (output, {exit layer: exit hidden})."""
        out = self.run(h, attention_mask, rope)
        return out.hidden, out.exit_hidden


class LanguageModel(nn.Module):
    """Container giving the ``language_model.*`` keys of one (stage, chunk)."""

    def __init__(self, config, ee, *, state, spec, vocab: int, recipe, rng_tracker=None):
        super().__init__()
        self.embedding = None
        if spec.has_embedding:
            self.embedding = Embedding(config, state=state, vocab=vocab, recipe=recipe, rng_tracker=rng_tracker)
        self.encoder = TransformerEncoder(config, ee, state=state, spec=spec, recipe=recipe, rng_tracker=rng_tracker)
        self.output_layer = None
        if spec.has_head and config.untie_embeddings_and_output_weights:
            self.output_layer = output_projection(config, state, vocab, recipe, 0, "output_layer.weight")
        self.exit_output_layer = None
        if spec.exits and ee.untie_exit_output_weights:
            self.exit_output_layer = nn.ModuleList(
                output_projection(config, state, vocab, recipe, layer, "exit_output_layer.weight")
                for layer in spec.exits)
