"""The feed-forward block (GeLU or SwiGLU), tensor-parallel, and EE-LLM's two-headed exit MLP.

SwiGLU keeps ``dense_h_to_4h`` as the stacked ``[W_gate; W_up]`` of Megatron (column-parallel with
stride 2, so every shard holds its slice of both halves). GeLU is the tanh approximation: Megatron's
default fused bias-GeLU kernel computes it, and GPT-2 was trained with it. PyTorch has no fused SwiGLU
kernel in eager mode: ``silu(gate) * up`` is two elementwise kernels beside two matmuls (``torch.compile``
fuses them; Transformer Engine's fused MLP is not wired in).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from .initialization import InitScope

__all__ = ["MLP", "ExitMLP"]


class MLP(nn.Module):
    def __init__(self, config, *, state, init: InitScope):
        super().__init__()
        self.swiglu = config.swiglu
        ffn = config.ffn_size
        common = dict(state=state, bias=config.add_bias_linear, sequence_parallel=config.sequence_parallel,
                      params_dtype=config.params_dtype)
        self.dense_h_to_4h = ColumnParallelLinear(
            config.hidden_size, 2 * ffn if self.swiglu else ffn, stride=2 if self.swiglu else 1,
            init_method=init.normal("dense_h_to_4h.weight"), **common)
        self.dense_4h_to_h = RowParallelLinear(
            ffn, config.hidden_size, input_is_parallel=True, init_method=init.scaled("dense_4h_to_h.weight"), **common)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.dense_h_to_4h(x)
        if self.swiglu:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        else:
            y = F.gelu(y, approximate="tanh")
        out, _ = self.dense_4h_to_h(y)
        return out


class ExitMLP(nn.Module):
    """``trunk`` is the backbone MLP, ``branch`` the exit's own MLP applied to the same normalised input
    (a container: the exit layer calls each, the trunk possibly without autograd under EE-Tuning).

    The trunk is initialised under the plain MLP's names, so adding an exit MLP leaves the backbone's
    initial weights unchanged."""

    def __init__(self, config, *, state, init: InitScope):
        super().__init__()
        self.trunk = MLP(config, state=state, init=init)
        self.branch = MLP(config, state=state, init=init.child("branch"))
