"""Exit layers, their optional parts, and the output heads shared by exits and the final head.

:class:`EarlyExitTransformerLayer` is a transformer layer (same submodule names, so the backbone keys
are unchanged) with EE-LLM's optional exit parts: ``exit_norm``, ``exit_block`` (a full extra layer
numbered ``L + num_layers``: its own KV-cache slot and init seeds) and an :class:`ExitMLP` in place of
``mlp`` (``y_exit = a + branch(post_attention_norm(a))`` beside ``y = a + trunk(...)``); and ours:
``exit_linear`` (:class:`ExitLinear`, ``--use-exit-linear``) and ``exit_estimator``
(:class:`ExitEstimator`, ``--exit-estimator``). Its forward returns the layer output and the exit's
pre-projection hidden state; a pre-exit takes the layer input.

The exit's hidden state is built in this order: (branch MLP) -> ``exit_block`` -> ``exit_linear`` ->
``exit_norm`` -> projection. The estimator reads none of these: it reads the trunk state (the layer's
output, or its input for a pre-exit), so at inference it costs two small matmuls however heavy the exit.

The projection / loss helpers work on vocab-parallel logits ``[s, b, V/tp]``; temperature and dynamic
token weights apply to exits in training only (EE-LLM never tempers at inference).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    linear,
    vocab_parallel_cross_entropy,
)
from megatron.core.transformer import ExitMLP, InitScope, SeededInit, TransformerLayer, build_norm

__all__ = ["EarlyExitTransformerLayer", "ExitLinear", "ExitEstimator", "lm_logits", "full_vocab_logits",
           "token_losses", "exit_confidence"]


class ExitLinear(nn.Module):
    """``h + W h + b`` (a "tuned lens" map), ``W`` ``[h, h]`` and ``b`` ``[h]`` zero-initialised so a new
    exit starts as the exit without it. Replicated over tp like a norm: under sequence parallelism it
    sees only its rank's sequence slice, so its parameters carry ``sequence_parallel`` and their
    gradients are summed over tp with the norms'."""

    def __init__(self, config, device=None):
        super().__init__()
        h, dtype = config.hidden_size, config.params_dtype
        self.weight = nn.Parameter(torch.zeros(h, h, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(h, device=device, dtype=dtype))
        if config.sequence_parallel:
            for p in self.parameters():
                p.sequence_parallel = True

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + linear(h, self.weight, self.bias)


class ExitEstimator(nn.Module):
    """The logit of P(this exit's top-1 token == the final head's top-1 token), from the trunk state.

    ``hidden`` -> RMS-normalised without a gain (``x / sqrt(mean(x^2) + eps)``, fp32) -> ``hidden``
    (Linear h -> H) -> exact GELU -> ``output`` (Linear H -> 1). Keys ``exit_estimator.hidden.{weight,bias}``
    and ``exit_estimator.output.{weight,bias}`` of the exit layer. Replicated over tp; training feeds it
    the detached, sequence-gathered trunk state, so every tp rank computes the same gradient and it
    never changes the exit or the backbone. Weights ~ N(0, --init-method-std) seeded by
    ``(seed, layer, name)``, biases 0; always drawn (also when a checkpoint load follows), so a checkpoint
    without an estimator gets a well-defined one."""

    def __init__(self, config, ee, *, layer_number: int, device=None):
        super().__init__()
        recipe = SeededInit(config.seed, config.init_method_std, config.num_layers)
        h, width, dtype = config.hidden_size, ee.exit_estimator_hidden, config.params_dtype
        self.eps = config.norm_epsilon
        self.hidden = nn.Linear(h, width, device=device, dtype=dtype)
        self.output = nn.Linear(width, 1, device=device, dtype=dtype)
        for name, module in (("hidden", self.hidden), ("output", self.output)):
            recipe.normal(layer_number, f"exit_estimator.{name}.weight")(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, trunk: torch.Tensor) -> torch.Tensor:
        """``[..., h]`` -> logits ``[...]`` (fp32)."""
        x = trunk.float()
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(self.hidden.weight.dtype)
        return self.output(F.gelu(self.hidden(x))).squeeze(-1).float()


class EarlyExitTransformerLayer(TransformerLayer):
    def __init__(self, config, ee, *, state, layer_number: int, recipe, rng_tracker=None):
        scope = InitScope(recipe, layer_number)
        mlp = ExitMLP(config, state=state, init=scope.child("mlp")) if ee.use_exit_mlp else None
        super().__init__(config, state=state, layer_number=layer_number, init=scope, rng_tracker=rng_tracker, mlp=mlp)
        self.pre_exit = ee.pre_exit
        self.exit_norm = build_norm(config, state.device) if ee.use_exit_norm else None
        self.exit_linear = ExitLinear(config, state.device) if ee.use_exit_linear else None
        self.exit_estimator = None
        if ee.exit_estimator:
            self.exit_estimator = ExitEstimator(config, ee, layer_number=layer_number, device=state.device)
        self.exit_block = None
        if ee.use_exit_block:
            block_number = layer_number + config.num_layers
            self.exit_block = TransformerLayer(
                config, state=state, layer_number=block_number, init=InitScope(recipe, block_number),
                rng_tracker=rng_tracker)

    def exit_head(self, h, attention_mask=None, rope=None, inference_params=None,
                  last: int | None = None) -> torch.Tensor:
        """Exit block, exit linear, exit norm (each if configured): the hidden state the exit projects.
        ``last``: of the last positions only (the exit block still runs on every position: they all need
        its KV)."""
        if self.exit_block is not None:
            h = self.exit_block(h, attention_mask, rope, inference_params)
        if last is not None:
            h = h[-last:]
        if self.exit_linear is not None:
            h = self.exit_linear(h)
        if self.exit_norm is not None:
            h = self.exit_norm(h)
        return h

    def forward(self, x, attention_mask=None, rope=None, inference_params=None, frozen: bool = False, *,
                with_exit: bool = True, exit_last: int | None = None):
        """-> ``(layer output, exit hidden)``, ``[s(/tp), b, h]`` and ``[s or exit_last, b, h]``.
        ``frozen``: the backbone part (the layer itself, the branch MLP's input) runs without autograd; only
        the exit parts build a graph. ``with_exit=False`` skips every part of the exit (its MLP branch,
        block, linear and norm: inference of an exit nobody consults) and returns ``(output, None)``;
        ``exit_last``: the exit hidden of the last positions only (inference consults an exit on the last
        position)."""
        if self.pre_exit and with_exit:
            h_exit = self.exit_head(x, attention_mask, rope, inference_params, exit_last)
        exit_mlp = isinstance(self.mlp, ExitMLP)
        with torch.no_grad() if frozen else contextlib.nullcontext():
            a = self.attention_block(x, attention_mask, rope, inference_params)
            n = self.post_attention_norm(a)
            y = self.dropout_add((self.mlp.trunk if exit_mlp else self.mlp)(n), a)
        if not with_exit:
            return y, None
        y_exit = y
        if exit_mlp:
            # without an exit block the exit's own work is cut to the positions it is consulted on
            cut = exit_last if self.exit_block is None else None
            n_b, a_b = (n, a) if cut is None else (n[-cut:], a[-cut:])
            # The branch's residual dropout belongs to the exit: under EE-Tuning it stays on while the
            # frozen layer's own dropout is off (see set_train_mode).
            y_exit = self.dropout_add(self.mlp.branch(n_b), a_b, self.mlp.branch.training)
        if not self.pre_exit:
            h_exit = self.exit_head(y_exit, attention_mask, rope, inference_params, exit_last)
        return y, h_exit

    def trunk_state(self, layer_input: torch.Tensor, layer_output: torch.Tensor) -> torch.Tensor:
        """The estimator's input: the layer's output, or its input for a pre-exit."""
        return layer_input if self.pre_exit else layer_output


def lm_logits(h: torch.Tensor, weight: torch.Tensor, tp_group, sequence_parallel: bool) -> torch.Tensor:
    """``h`` ``[s(/tp), b, h]`` times the vocab-parallel ``weight`` ``[V/tp, h]`` -> ``[s, b, V/tp]``."""
    if sequence_parallel:
        h = gather_from_sequence_parallel_region(h, tp_group, tensor_parallel_output_grad=True)
    else:
        h = copy_to_tensor_model_parallel_region(h, tp_group)
    return linear(h, weight)


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
