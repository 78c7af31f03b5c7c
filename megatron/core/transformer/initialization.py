"""Layout-independent initialisation: every weight drawn whole from its own seeded generator.

A weight's generator is seeded from ``(seed, global layer number, parameter name)`` (a stable hash,
not Python's salted ``hash``), and the tensor-parallel layers fill the FULL weight with it before keeping
their shard. So a weight's values depend on neither tp, pp, vpp nor the construction order, and copies
of a tied weight on several stages come out identical without any communication.

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

__all__ = ["SeededInit", "InitScope", "derive_seed"]

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

    def normal(self, layer: int, name: str, std: float | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        std = self.std if std is None else std

        def fill(w: torch.Tensor) -> torch.Tensor:
            g = torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, layer, name))
            with torch.no_grad():
                return w.normal_(0.0, std, generator=g)

        return fill

    def scope(self, layer: int, prefix: str = "") -> "InitScope":
        return InitScope(self, layer, prefix)


@dataclass(frozen=True)
class InitScope:
    """Names parameters relative to a module (``prefix``) inside global layer ``layer``. A scope over
    ``None`` (no recipe) hands out ``None`` init methods: zero weights to be loaded afterwards."""

    recipe: SeededInit | None
    layer: int
    prefix: str = ""

    def child(self, name: str) -> "InitScope":
        return InitScope(self.recipe, self.layer, f"{self.prefix}{name}.")

    def normal(self, name: str) -> InitMethod:
        return None if self.recipe is None else self.recipe.normal(self.layer, self.prefix + name)

    def scaled(self, name: str) -> InitMethod:
        if self.recipe is None:
            return None
        std = self.recipe.std / math.sqrt(2.0 * self.recipe.num_layers)
        return self.recipe.normal(self.layer, self.prefix + name, std)
