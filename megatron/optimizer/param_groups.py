"""Optimizer parameter groups (Megatron's rules) and the parameter flags gradient-norm code reads.

Groups: weight decay applies to matrices only; biases and norm weights (1-D parameters, or names ending
in ``.bias``) get ``wd_mult = 0``. A ``scale_lr_cond`` selects parameters whose learning rate is scaled
by ``lr_mult``. The scheduler sets ``lr = lr * lr_mult`` and ``weight_decay = wd * wd_mult`` per group.
Frozen parameters (``requires_grad=False``, e.g. the backbone in EE-Tuning) are left out; the result may
be empty (a pipeline stage with nothing to train), which the optimizers accept.

Flags (set by the model code, read here so that every norm counts each value once):
``param.tensor_model_parallel`` -- True on tensor-parallel shards (set by the tp layers); parameters
without it are replicated over tp ranks. ``param.shared`` -- True on a tied weight's copies other than the
first stage's (e.g. the output embedding on the last stage).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

__all__ = ["get_param_groups", "counted_once"]

ParamCond = Callable[[str, nn.Parameter], bool]


def get_param_groups(
    model_chunks: Iterable[nn.Module],
    no_weight_decay_cond: ParamCond | None = None,
    scale_lr_cond: ParamCond | None = None,
    lr_mult: float = 1.0,
) -> list[dict]:
    """Megatron's four groups (wd x scaled-lr), each ``{'params', 'wd_mult', 'lr_mult'}``; empty ones dropped.

    ``no_weight_decay_cond(name, param)`` overrides the default rule (bias or 1-D: no decay);
    ``scale_lr_cond(name, param)`` picks parameters whose learning rate is multiplied by ``lr_mult``."""
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if no_weight_decay_cond is not None:
                no_wd = bool(no_weight_decay_cond(name, param))
            else:
                no_wd = name.endswith(".bias") or param.dim() == 1
            scaled = scale_lr_cond is not None and bool(scale_lr_cond(name, param))
            buckets.setdefault((no_wd, scaled), []).append(param)
    # Megatron's order: (wd, lr), (wd, scaled lr), (no wd, lr), (no wd, scaled lr).
    groups = []
    for no_wd, scaled in ((False, False), (False, True), (True, False), (True, True)):
        if (no_wd, scaled) in buckets:
            groups.append({"params": buckets[(no_wd, scaled)], "wd_mult": 0.0 if no_wd else 1.0,
                           "lr_mult": lr_mult if scaled else 1.0})
    return groups


def counted_once(param: torch.Tensor, tp_rank: int) -> bool:
    """Whether this rank's copy of ``param`` enters a model-wide sum (grad norm, zero count): tp shards
    always; tp-replicated parameters only on tp rank 0; ``shared`` tied copies never (the first copy counts)."""
    if getattr(param, "shared", False):
        return False
    return bool(getattr(param, "tensor_model_parallel", False)) or tp_rank == 0
