"""Console output of a training run: logging set-up, Megatron-format log lines, a progress bar.

The line formats are Megatron's (`` iteration      N/      M | consumed samples: ... | lm loss:
6.907755E+00 | ...``) so that users' log parsers keep working; the early-exit fields follow EE-LLM's
names (``early loss [L]``, ``exit weight [L]``).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Mapping

__all__ = ["configure_logging", "format_train_line", "format_eval_line", "ppl", "has_ppl", "ProgressBar"]


def configure_logging(rank: int) -> None:
    """INFO on rank 0, warnings only elsewhere (one copy of each message per job)."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="[%(asctime)s] %(levelname)s %(name)s: %(message)s", force=True)


def format_train_line(*, iteration: int, train_iters: int, consumed_samples: int, ms_per_iteration: float,
                      learning_rate: float, global_batch_size: int, losses: Mapping[str, float],
                      exit_weights: Mapping[int, float], loss_scale: float, grad_norm: float | None,
                      num_zeros: int | None, skipped: int, nan: int, tokens_per_second: float,
                      tflops_per_device: float, peak_memory_mb: float) -> str:
    parts = [
        f" iteration {iteration:8d}/{train_iters:8d}",
        f" consumed samples: {consumed_samples:12d}",
        f" elapsed time per iteration (ms): {ms_per_iteration:.1f}",
        f" learning rate: {learning_rate:.3E}",
        f" global batch size: {global_batch_size:5d}",
    ]
    parts += [f" {key}: {value:.6E}" for key, value in losses.items()]
    parts += [f" exit weight [{layer}]: {w:.6E}" for layer, w in exit_weights.items()]
    parts.append(f" loss scale: {loss_scale:.1f}")
    if grad_norm is not None:
        parts.append(f" grad norm: {grad_norm:.3f}")
    if num_zeros is not None:
        parts.append(f" num zeros: {num_zeros:.1f}")
    parts += [
        f" number of skipped iterations: {skipped:3d}",
        f" number of nan iterations: {nan:3d}",
        f" tokens per second: {tokens_per_second:.1f}",
        f" TFLOP/s per device: {tflops_per_device:.3f}",
        f" peak memory (MB): {peak_memory_mb:.1f}",
    ]
    return "".join(f"{p} |" for p in parts)


def has_ppl(key: str) -> bool:
    """Whether a logged value is a token cross-entropy with a perplexity (not an agreement share or the
    estimators' binary loss)."""
    return key == "lm loss" or key.startswith("early loss")


def ppl(loss: float) -> float:
    """Perplexity of a mean token loss."""
    return math.exp(min(20.0, loss))  # Megatron's cap keeps the print finite


def format_eval_line(where: str, losses: Mapping[str, float]) -> str:
    """`` validation loss at iteration N | lm loss value: ... | lm loss PPL: ... | early loss [L] value: ...``"""
    parts = [f" validation loss at {where}"]
    for key, value in losses.items():
        parts.append(f" {key} value: {value:.6E}")
        if has_ppl(key):
            parts.append(f" {key} PPL: {ppl(value):.6E}")
    return "".join(f"{p} |" for p in parts)


class ProgressBar:
    """A one-line bar on an interactive terminal (nothing when ``stream`` is not a TTY)."""

    def __init__(self, total: int, start: int = 0, stream=None, width: int = 30):
        self.stream = stream if stream is not None else sys.stdout
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total, self.start, self.width = max(total, 1), start, width
        self.t0 = time.monotonic()
        self._shown = False

    def update(self, iteration: int) -> None:
        if not self.enabled:
            return
        frac = min(iteration / self.total, 1.0)
        done = iteration - self.start
        rate = done / max(time.monotonic() - self.t0, 1e-9)
        eta = (self.total - iteration) / rate if rate > 0 else float("inf")
        filled = int(frac * self.width)
        eta_text = f"{eta:.0f}s" if math.isfinite(eta) else "?"
        self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {iteration}/{self.total} "
                          f"{rate:.2f} it/s eta {eta_text}")
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        """Erase the bar before a log line is printed."""
        if self.enabled and self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = False
