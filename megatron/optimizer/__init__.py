"""Optimizers of a training run: parameter groups, fp32 masters and loss scaling, global-norm clipping, and
the data-parallel-sharded distributed optimizer. :func:`get_megatron_optimizer` builds the right one from
an :class:`OptimizerConfig`; :func:`build_scheduler` its lr / weight-decay schedule (``optimizer_param_scheduler``).
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from megatron.core.distributed.grad_buffer import GradBuffers
from megatron.core.parallel_state import ParallelState
from megatron.optimizer.config import OptimizerConfig
from megatron.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler, build_grad_scaler
from megatron.optimizer.optimizer import MixedPrecisionOptimizer
from megatron.optimizer.optimizer_param_scheduler import OptimizerParamScheduler, build_scheduler
from megatron.optimizer.param_groups import ParamCond, counted_once, get_param_groups

__all__ = [
    "OptimizerConfig",
    "MixedPrecisionOptimizer",
    "DistributedOptimizer",
    "ConstantGradScaler",
    "DynamicGradScaler",
    "build_grad_scaler",
    "get_param_groups",
    "counted_once",
    "get_megatron_optimizer",
    "OptimizerParamScheduler",
    "build_scheduler",
]


def get_megatron_optimizer(
    config: OptimizerConfig,
    model_chunks: Sequence[nn.Module],
    state: ParallelState,
    grad_buffers: Sequence[GradBuffers] = (),
    no_weight_decay_cond: ParamCond | None = None,
    scale_lr_cond: ParamCond | None = None,
    lr_mult: float = 1.0,
) -> MixedPrecisionOptimizer:
    """The optimizer over the trainable parameters of ``model_chunks`` (whose ``main_grad`` buffers are
    ``grad_buffers``, one per chunk; built with ``reduce_scatter=True`` for the distributed optimizer)."""
    groups = get_param_groups(model_chunks, no_weight_decay_cond, scale_lr_cond, lr_mult)
    scaler = build_grad_scaler(config)
    if config.use_distributed_optimizer:
        return DistributedOptimizer(groups, config, state, list(grad_buffers), scaler)
    return MixedPrecisionOptimizer(groups, config, state, scaler)
