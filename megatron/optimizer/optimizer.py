"""The mixed-precision optimizer: fp32 master weights, loss-scale handling, inf/nan skip, clipping.

The optimizer works on *slots*: a slot is a flat range ``[lo, hi)`` of one model parameter together with
the fp32 tensor the torch optimizer updates for it (the master). Here every slot covers a whole parameter;
the distributed optimizer (``distrib_optimizer.py``) makes one slot per piece of a parameter that falls in
this rank's reduce-scatter shard and otherwise reuses everything below.

Masters: a bf16/fp16 parameter gets an fp32 copy; any other parameter is its own master (no copy).
Gradients come from ``param.main_grad`` (the data-parallel gradient buffers), never ``param.grad``: the
master's ``.grad`` aliases ``main_grad`` when that is already fp32 (``--accumulate-allreduce-grads-in-fp32``)
and is an fp32 copy otherwise; it is dropped after every step so the next backward starts clean.

``step()``: unscale the gradients by the loss scale and check them for inf/nan over the model (an
all-reduce MAX); on inf/nan the step is skipped, the dynamic scaler backs off and ``num_skipped_iters``
counts it. Unlike Megatron, this check also runs without a loss scaler (bf16, fp32): a nan gradient skips
the step instead of writing nan into the weights. Then clip by the global L2 norm, step, and copy the
masters back into the model parameters.

Every rank of the model-parallel group must call ``step()`` together, also ranks with no trainable
parameter (an EE-Tuning stage without exits): they take part in the collectives with empty contributions
and their step is otherwise a no-op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron.core.parallel_state import ParallelState
from megatron.optimizer.clip_grads import (
    clip_by_total_norm,
    count_zeros,
    global_grad_norm,
    unscale_and_check_finite,
)
from megatron.optimizer.config import OptimizerConfig
from megatron.optimizer.grad_scaler import GradScaler
from megatron.optimizer.param_groups import counted_once

__all__ = ["MixedPrecisionOptimizer", "Slot", "build_torch_optimizer"]

_HALF = (torch.float16, torch.bfloat16)


@dataclass
class Slot:
    """Flat range ``[lo, hi)`` of ``param`` (global index ``index`` in group order) optimised via ``master``."""

    param: torch.nn.Parameter
    index: int
    group: int
    lo: int
    hi: int
    master: torch.Tensor
    counted: bool  # enters model-wide sums (norm, zero count)

    @property
    def has_copy(self) -> bool:
        return self.param.dtype in _HALF

    def model_view(self) -> torch.Tensor:
        return self.param.detach().view(-1)[self.lo:self.hi].view_as(self.master)

    def grad(self) -> torch.Tensor:
        g = self.param.main_grad.view(-1)[self.lo:self.hi].view_as(self.master)
        return g if g.dtype == torch.float32 else g.float()


def make_master(param: torch.nn.Parameter, lo: int, hi: int, flat: bool) -> torch.Tensor:
    """The tensor the torch optimizer updates for ``param[lo:hi]``: an fp32 copy for half parameters, an
    alias of the parameter (the parameter itself for a whole, non-flat slot) otherwise."""
    if not flat and param.dtype not in _HALF:
        return param
    view = param.detach().view(-1)[lo:hi] if flat else param.detach()
    return view.clone().float() if param.dtype in _HALF else view


def build_torch_optimizer(config: OptimizerConfig, groups: list[dict]) -> torch.optim.Optimizer | None:
    """AdamW (Megatron's Adam: apex FusedAdam in adam_w_mode, i.e. decoupled weight decay) or SGD with
    momentum over ``groups``; ``None`` when there is nothing to optimise (torch rejects empty optimizers)."""
    if not any(g["params"] for g in groups):
        return None
    if config.optimizer == "adam":
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay,
                                 betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, weight_decay=config.weight_decay, momentum=config.sgd_momentum)
    raise ValueError(f"--optimizer must be adam or sgd, got {config.optimizer!r}")


class MixedPrecisionOptimizer:
    """Wraps a torch optimizer over fp32 masters of the model parameters in ``param_groups``
    (from :func:`~megatron.optimizer.param_groups.get_param_groups`)."""

    def __init__(self, param_groups: list[dict], config: OptimizerConfig, state: ParallelState,
                 grad_scaler: GradScaler | None = None):
        self.config = config
        self.state = state
        self.grad_scaler = grad_scaler
        self.clip_grad = config.clip_grad
        self.num_skipped_iters = 0
        self.device = state.device
        for i, p in enumerate(p for g in param_groups for p in g["params"]):
            if not hasattr(p, "main_grad"):
                raise ValueError(f"parameter {i} {tuple(p.shape)} has no main_grad: build GradBuffers over the "
                                 "model chunks before the optimizer")
        self.slots = self._build_slots(param_groups)
        groups = []
        for gi, g in enumerate(param_groups):
            masters = [s.master for s in self.slots if s.group == gi]
            if masters:  # a dp shard may hold nothing of a group
                # Until a scheduler sets them, the multipliers apply to the configured values.
                groups.append({"params": masters, "wd_mult": g["wd_mult"], "lr_mult": g["lr_mult"],
                               "lr": config.lr * g["lr_mult"], "weight_decay": config.weight_decay * g["wd_mult"]})
        self.optimizer = build_torch_optimizer(config, groups)

    # ---------------------------------------------------------------- layout (overridden by the distributed one)
    def _build_slots(self, param_groups: list[dict]) -> list[Slot]:
        slots, index = [], 0
        for gi, g in enumerate(param_groups):
            for p in g["params"]:
                slots.append(Slot(p, index, gi, 0, p.numel(), make_master(p, 0, p.numel(), flat=False),
                                  counted_once(p, self.state.tp_rank)))
                index += 1
        return slots

    @property
    def reduce_groups(self) -> list:
        """Groups over which this rank's share of a model-wide sum is combined."""
        return [self.state.mp_group]

    @property
    def param_groups(self) -> list[dict]:
        """The torch optimizer's groups (the scheduler writes ``lr`` / ``weight_decay`` here); empty when
        this rank has nothing to optimise."""
        return self.optimizer.param_groups if self.optimizer is not None else []

    # ---------------------------------------------------------------- loss scale
    @property
    def loss_scale(self) -> float:
        return self.grad_scaler.scale if self.grad_scaler is not None else 1.0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to back-propagate (final and exit losses alike)."""
        return loss * self.loss_scale if self.grad_scaler is not None else loss

    # ---------------------------------------------------------------- step
    @torch.no_grad()
    def step(self) -> tuple[bool, float | None, int | None]:
        """One update from ``main_grad``. Returns ``(update_successful, grad_norm, num_zeros_in_grad)``;
        ``grad_norm`` is the pre-clipping global norm (``None`` without ``--clip-grad``)."""
        grads = []
        for s in self.slots:
            s.master.grad = s.grad()
            grads.append(s.master.grad)
        try:
            inv = self.grad_scaler.inv_scale if self.grad_scaler is not None else None
            found_inf = unscale_and_check_finite(grads, inv, self.reduce_groups, self.device)
            if self.grad_scaler is not None:
                self.grad_scaler.update(found_inf)
            if found_inf:
                self.num_skipped_iters += 1
                return False, None, None
            counted = [g for s, g in zip(self.slots, grads) if s.counted]
            grad_norm = None
            if self.clip_grad > 0:
                grad_norm = global_grad_norm(counted, self.reduce_groups, self.device)
                if not math.isfinite(grad_norm):  # finite grads whose squares overflow fp32
                    self.num_skipped_iters += 1
                    return False, grad_norm, None
                clip_by_total_norm(grads, self.clip_grad, grad_norm)
            zeros = None
            if self.config.log_num_zeros_in_grad:
                zeros = count_zeros(counted, self.reduce_groups, self.device)
            if self.optimizer is not None:
                self.optimizer.step()
            self._copy_masters_to_model()
            return True, grad_norm, zeros
        finally:
            for s in self.slots:
                s.master.grad = None

    def _copy_masters_to_model(self) -> None:
        for s in self.slots:
            if s.has_copy:
                s.model_view().copy_(s.master)

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Refresh the fp32 masters from the model parameters (after loading model weights only)."""
        for s in self.slots:
            if s.has_copy:
                s.master.copy_(s.model_view())

    def zero_grad(self) -> None:
        """Master gradients never outlive a step; the gradient buffers are zeroed by ``GradBuffers.zero_grad``."""
        for s in self.slots:
            s.master.grad = None

    # ---------------------------------------------------------------- memory / checkpoint
    def state_bytes(self) -> int:
        """Bytes of optimizer state and fp32 master copies held by this rank."""
        total = sum(s.master.numel() * 4 for s in self.slots if s.has_copy)
        if self.optimizer is not None:
            for st in self.optimizer.state.values():
                total += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
        return total

    def _layout(self) -> list[tuple[int, int, int]]:
        return [(s.index, s.lo, s.hi) for s in self.slots]

    def _layout_description(self) -> str:
        return "the plain optimizer"

    def state_dict(self) -> dict:
        """Torch optimizer state, fp32 masters of half parameters (Megatron's ``fp32_from_fp16_params`` key),
        grad scaler, and the slot layout used to refuse an incompatible load. As with torch optimizers the
        tensors are live references: save (or copy) the dict before the next step."""
        return {
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "fp32_from_fp16_params": [s.master.detach() for s in self.slots if s.has_copy],
            "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "num_skipped_iters": self.num_skipped_iters,
            "layout": self._layout(),
            "layout_description": self._layout_description(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if [tuple(x) for x in state["layout"]] != self._layout():
            raise ValueError(
                f"optimizer checkpoint was saved by {state.get('layout_description', 'another layout')} but this "
                f"run uses {self._layout_description()} over different parameters; load it with the same model, "
                "--use-distributed-optimizer setting and data-parallel size, or skip it with --no-load-optim"
            )
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        for s, saved in zip([s for s in self.slots if s.has_copy], state["fp32_from_fp16_params"]):
            s.master.copy_(saved)
        if self.grad_scaler is not None and state.get("grad_scaler") is not None:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.num_skipped_iters = int(state.get("num_skipped_iters", 0))
