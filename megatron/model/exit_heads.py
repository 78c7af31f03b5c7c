"""Exit layers and the output heads shared by exits and the final head.

:class:`EarlyExitTransformerLayer` is a transformer layer (same submodule names, so the backbone keys
are unchanged) with EE-LLM's optional exit parts: ``exit_norm``, ``exit_block`` (a full extra layer
numbered ``L + num_layers``: its own KV-cache slot and init seeds) and an :class:`ExitMLP` in place of
``mlp`` (``y_exit = a + branch(post_attention_norm(a))`` beside ``y = a + trunk(...)``). Its forward
returns the layer output and the exit's pre-projection hidden state; a pre-exit takes the layer input.

The projection / loss helpers work on vocab-parallel logits ``[s, b, V/tp]``; temperature and dynamic
token weights apply to exits in training only (EE-LLM never tempers at inference).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)
from megatron.core.transformer import ExitMLP, InitScope, TransformerLayer, build_norm

__all__ = ["EarlyExitTransformerLayer", "lm_logits", "full_vocab_logits", "token_losses", "exit_confidence"]


class EarlyExitTransformerLayer(TransformerLayer):
    def __init__(self, config, ee, *, state, layer_number: int, recipe, rng_tracker=None):
        scope = InitScope(recipe, layer_number)
        mlp = ExitMLP(config, state=state, init=scope.child("mlp")) if ee.use_exit_mlp else None
        super().__init__(config, state=state, layer_number=layer_number, init=scope, rng_tracker=rng_tracker, mlp=mlp)
        self.pre_exit = ee.pre_exit
        self.exit_norm = build_norm(config, state.device) if ee.use_exit_norm else None
        self.exit_block = None
        if ee.use_exit_block:
            block_number = layer_number + config.num_layers
            self.exit_block = TransformerLayer(
                config, state=state, layer_number=block_number, init=InitScope(recipe, block_number),
                rng_tracker=rng_tracker)

    def exit_head(self, h, attention_mask=None, rope=None, inference_params=None,
                  last: int | None = None) -> torch.Tensor:
        """Exit block then exit norm (each if configured): the hidden state the exit projects. ``last``: of
        the last positions only (the exit block still runs on every position: they all need its KV)."""
        if self.exit_block is not None:
            h = self.exit_block(h, attention_mask, rope, inference_params)
        if last is not None:
            h = h[-last:]
        if self.exit_norm is not None:
            h = self.exit_norm(h)
        return h

    def forward(self, x, attention_mask=None, rope=None, inference_params=None, *, with_exit: bool = True,
                exit_last: int | None = None):
        """-> ``(layer output, exit hidden)``, ``[s(/tp), b, h]`` and ``[s or exit_last, b, h]``.
        ``with_exit=False`` skips every part of the exit (its MLP branch, block and norm: inference of an
        exit nobody consults) and returns ``(output, None)``; ``exit_last``: the exit hidden of the last
        positions only (inference consults an exit on the last position)."""
        if self.pre_exit and with_exit:
            h_exit = self.exit_head(x, attention_mask, rope, inference_params, exit_last)
        a = self.attention_block(x, attention_mask, rope, inference_params)
        n = self.post_attention_norm(a)
        # without an exit block the exit's own work is cut to the positions it is consulted on
        cut = exit_last if self.exit_block is None else None
        if not isinstance(self.mlp, ExitMLP):
            y = y_exit = self.dropout_add(self.mlp(n), a)
        elif with_exit and cut is None:  # training (and full-sequence inference): exactly as trained
            trunk, branch = self.mlp(n)
            # The branch's residual dropout belongs to the exit: under EE-Tuning it stays on while the
            # frozen layer's own dropout is off (see set_train_mode).
            y, y_exit = self.dropout_add(trunk, a), self.dropout_add(branch, a, self.mlp.branch.training)
        else:
            y = self.dropout_add(self.mlp.trunk(n), a)
            y_exit = None
            if with_exit and not self.pre_exit:
                y_exit = self.dropout_add(self.mlp.branch(n[-cut:]), a[-cut:])
        if not with_exit:
            return y, None
        if not self.pre_exit:
            h_exit = self.exit_head(y_exit, attention_mask, rope, inference_params, exit_last)
        return y, h_exit


def lm_logits(h: torch.Tensor, weight: torch.Tensor, tp_group, sequence_parallel: bool) -> torch.Tensor:
    """``h`` ``[s(/tp), b, h]`` times the vocab-parallel ``weight`` ``[V/tp, h]`` -> ``[s, b, V/tp]``."""
    if sequence_parallel:
        h = gather_from_sequence_parallel_region(h, tp_group, tensor_parallel_output_grad=True)
    else:
        h = copy_to_tensor_model_parallel_region(h, tp_group)
    return F.linear(h, weight)


def full_vocab_logits(logits: torch.Tensor, tp_group) -> torch.Tensor:
    """Vocab-parallel ``[s, b, V/tp]`` -> full ``[b, s, V]`` (inference)."""
    return gather_from_tensor_model_parallel_region(logits, tp_group).transpose(0, 1).contiguous()


def token_losses(logits: torch.Tensor, labels: torch.Tensor, tp_group) -> torch.Tensor:
    """Per-token cross entropy ``[b, s]`` of vocab-parallel logits ``[s, b, V/tp]``."""
    return vocab_parallel_cross_entropy(logits, labels.t().contiguous(), tp_group).t()


@torch.no_grad()
def exit_confidence(logits: torch.Tensor, tp_group) -> torch.Tensor:
    """Top-1 softmax probability per token, ``[s, b]``, over the full (vocab-parallel) vocabulary."""
    x = logits.float()
    top = x.max(dim=-1).values
    if tp_group is not None:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=tp_group)
    denom = torch.exp(x - top.unsqueeze(-1)).sum(dim=-1)
    if tp_group is not None:
        dist.all_reduce(denom, group=tp_group)
    return denom.reciprocal()
