"""Range checks of integer model inputs (token ids, targets, positions) that never stall an accelerator.

An id outside the embedding or the vocabulary does not fail loudly by itself on every device (a gather
reads garbage or a kernel asserts without saying which input was wrong), so the model checks its
inputs. Reading ``ids.min()`` on the host costs nothing on the CPU but makes the host wait for the GPU
on every forward, emptying its queue of kernels. So :func:`check_index_range` reads the values only on
the CPU (and raises a ``ValueError`` naming the range found and the fix); on an accelerator it queues the
same comparison on the device (``torch._assert_async``), which stops the run with a device-side
assertion at the next synchronisation. The training loop checks each batch on its host copy before it
moves to the device (:func:`check_token_batch`), where the clear message costs nothing.
"""

from __future__ import annotations

import torch

__all__ = ["check_index_range", "check_token_batch"]


def check_index_range(values: torch.Tensor, high: int, what: str, fix: str) -> None:
    """Every entry of ``values`` must lie in ``[0, high)``; else ``"{what} must lie in [0, high) ...; {fix}"``."""
    if values.numel() == 0:
        return
    if values.device.type == "cpu":
        low_seen, high_seen = int(values.min()), int(values.max())
        if low_seen < 0 or high_seen >= high:
            raise ValueError(f"{what} must lie in [0, {high}) but range over [{low_seen}, {high_seen}]; {fix}")
        return
    torch._assert_async(((values >= 0) & (values < high)).all(), f"{what} must lie in [0, {high}); {fix}")


def check_token_batch(tokens: torch.Tensor, vocab: int) -> None:
    """A data batch (inputs and labels) against the model's padded vocabulary, on its host copy."""
    check_index_range(tokens, vocab, "the data's token ids",
                      "the data's tokenizer and the model's (padded) vocab size disagree: check --tokenizer-type "
                      "/ --vocab-file / --vocab-size against the data's preprocessing")
