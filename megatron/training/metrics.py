"""Numbers the training log reports: losses gathered over the pipeline and averaged over data parallelism,
model FLOPs per iteration, peak memory, and their accumulation over a log interval.

Every stage reports the losses it computed (the last stage ``lm loss``, exit stages ``early loss [L]``, and
with the final head as teacher ``exit agreement [L]`` and ``estimator loss [L]``);
:func:`reduce_losses` sums each key over the pipeline group and averages it over the data-parallel group,
so every rank ends with the full dict (EE-LLM's console showed only the last stage's exits).
"""

from __future__ import annotations

import math
import resource
import sys
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.distributed as dist

from megatron.config import EarlyExitConfig, ModelConfig
from megatron.core.parallel_state import ParallelState

__all__ = ["loss_keys", "reduce_losses", "flops_per_iteration", "peak_memory_mb", "IntervalStats"]


def loss_keys(ee: EarlyExitConfig) -> list[str]:
    """Every loss a step can report, in console order."""
    keys = ["lm loss"] + [f"early loss [{layer}]" for layer in ee.exit_layer_nums]
    if ee.needs_teacher:
        keys += [f"exit agreement [{layer}]" for layer in ee.exit_layer_nums]
    if ee.exit_estimator:
        keys += [f"estimator loss [{layer}]" for layer in ee.exit_layer_nums]
    return keys


def _reduce(t: torch.Tensor, group) -> None:
    if group is not None:
        dist.all_reduce(t, group=group)


def reduce_losses(local: Mapping[str, float], keys: Sequence[str], state: ParallelState) -> dict[str, float]:
    """``{key: value}`` over the whole model: each key summed over the stages computing it, averaged over
    the data-parallel replicas. Keys no rank computed are left out. Collective over pp and dp groups."""
    device = state.device if state.backend == "nccl" else torch.device("cpu")
    values = torch.tensor([[float(local.get(k, 0.0)), float(k in local)] for k in keys], dtype=torch.float64,
                          device=device)
    _reduce(values, state.pp_group)
    _reduce(values, state.dp_group)
    return {k: float(v / n) for k, (v, n) in zip(keys, values.cpu().tolist()) if n > 0}


def _forward_flops_per_token(model: ModelConfig, ee: EarlyExitConfig, vocab: int) -> tuple[float, float]:
    """Matmul FLOPs of one token's forward (2 per multiply-add) -> (whole model, exits' share):
    projections, attention scores and values, MLP, one vocabulary projection per exit and the head."""
    h, heads, d, s = model.hidden_size, model.num_attention_heads, model.head_dim, model.seq_length
    kv = model.query_groups * d
    attention = 2 * h * (heads * d + 2 * kv) + 2 * heads * d * h + 2 * 2 * s * heads * d
    mlp = 2 * h * model.ffn_size * (3 if model.swiglu else 2)
    exits = len(ee.exit_layer_nums)
    per_exit = 2 * h * vocab + (attention + mlp if ee.use_exit_block else 0) + (mlp if ee.use_exit_mlp else 0)
    total = model.num_layers * (attention + mlp) + 2 * h * vocab + exits * per_exit
    return total, exits * per_exit


def flops_per_iteration(model: ModelConfig, ee: EarlyExitConfig, vocab: int, samples: int,
                        tune_exit: bool = False) -> float:
    """Model FLOPs of one iteration over ``samples`` sequences: the forward, plus a backward of twice the
    forward of what trains (only the exits under EE-Tuning: the frozen backbone builds no graph)."""
    total, exit_part = _forward_flops_per_token(model, ee, vocab)
    tokens = samples * model.seq_length
    return tokens * (total + 2.0 * (exit_part if tune_exit else total))


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


@dataclass
class IntervalStats:
    """Sums over the iterations since the last console line (Megatron averages losses over the
    interval's successful iterations)."""

    iterations: int = 0
    skipped: int = 0
    nan: int = 0
    elapsed: float = 0.0
    loss_sums: dict[str, float] = field(default_factory=dict)
    loss_counts: dict[str, int] = field(default_factory=dict)

    def add(self, losses: Mapping[str, float], skipped: bool, elapsed: float) -> None:
        self.iterations += 1
        self.elapsed += elapsed
        self.skipped += int(skipped)
        if any(not math.isfinite(v) for v in losses.values()):
            self.nan += 1
        if skipped:
            return
        for k, v in losses.items():
            self.loss_sums[k] = self.loss_sums.get(k, 0.0) + v
            self.loss_counts[k] = self.loss_counts.get(k, 0) + 1

    def mean_losses(self) -> dict[str, float]:
        return {k: self.loss_sums[k] / self.loss_counts[k] for k in self.loss_sums}

    @property
    def time_per_iteration(self) -> float:
        return self.elapsed / max(self.iterations, 1)
