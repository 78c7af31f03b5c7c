"""Layout-independent initialisation: every weight drawn whole from its own seeded generator.

A weight's generator is seeded from ``(seed, global layer number, parameter name)`` (a stable hash,
not Python's salted ``hash``), and the tensor-parallel layers fill the FULL weight with it before keeping
their shard. So a weight's values depend on neither tp, pp, vpp nor the construction order, and copies
of a tied weight on several stages come out identical without any communication.

The weight is drawn on the device it lives on, with that device's generator: a GPU rank draws its
stage's weights at GPU speed instead of every rank drawing them on the CPU (hours for a 70B model).
Values therefore depend on the device type (the CPU's Mersenne twister and CUDA's Philox differ, and
CUDA's draws on the GPU model), never on the parallel layout; ``--use-cpu-initialization`` draws on the
CPU everywhere (a GPU run then starts from the weights of a CPU run). When a checkpoint is loaded right after,
:class:`SkipInit` draws nothing: the layers allocate their shards uninitialised and the strict load
overwrites every one.

Megatron's scheme: ``N(0, std)`` for embeddings, QKV, ``dense_h_to_4h`` and output projections;
``N(0, std / sqrt(2 * num_layers))`` (its ``scaled_init_method``) for ``dense`` and ``dense_4h_to_h``.
Norm weights are ones and biases zeros (done by the layers themselves).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron.core.tensor_parallel.layers import uninitialized

__all__ = ["SeededInit", "SkipInit", "InitScope", "derive_seed"]

InitMethod = Optional[Callable[[torch.Tensor], object]]


def derive_seed(seed: int, layer: int, name: str) -> int:
    """A 63-bit seed, stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}/{layer}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class SeededInit:
    """The model-wide recipe: base seed, ``--init-method-std`` and the depth used for scaled init."""

    seed: int
    std: float
    num_layers: int
    on_cpu: bool = False  # --use-cpu-initialization: draw on the CPU whatever the weight's device

    def normal(self, layer: int, name: str, std: float | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        std = self.std if std is None else std

        def fill(w: torch.Tensor) -> torch.Tensor:
            device = torch.device("cpu") if self.on_cpu else w.device
            g = torch.Generator(device=device).manual_seed(derive_seed(self.seed, layer, name))
            with torch.no_grad():
                if device == w.device:
                    return w.normal_(0.0, std, generator=g)
                return w.copy_(torch.empty(w.shape, dtype=w.dtype).normal_(0.0, std, generator=g))

        return fill

    def scaled(self, layer: int, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """Megatron's ``scaled_init_method``: ``std / sqrt(2 * num_layers)``."""
        return self.normal(layer, name, self.std / math.sqrt(2.0 * self.num_layers))

    def scope(self, layer: int, prefix: str = "") -> "InitScope":
        return InitScope(self, layer, prefix)


@dataclass(frozen=True)
class SkipInit:
    """No draws at all: every weight is allocated uninitialised (a strict checkpoint load follows)."""

    def normal(self, layer: int, name: str, std: float | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        return uninitialized

    def scaled(self, layer: int, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return uninitialized


@dataclass(frozen=True)
class InitScope:
    """Names parameters relative to a module (``prefix``) inside global layer ``layer``. A scope over
    ``None`` (no recipe) hands out ``None`` init methods: zero weights to be loaded afterwards."""

    recipe: SeededInit | SkipInit | None
    layer: int
    prefix: str = ""

    def child(self, name: str) -> "InitScope":
        return InitScope(self.recipe, self.layer, f"{self.prefix}{name}.")

    def normal(self, name: str) -> InitMethod:
        return None if self.recipe is None else self.recipe.normal(self.layer, self.prefix + name)

    def scaled(self, name: str) -> InitMethod:
        return None if self.recipe is None else self.recipe.scaled(self.layer, self.prefix + name)
