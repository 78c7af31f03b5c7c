"""Per-layer key/value cache for incremental decoding.

:class:`InferenceParams` holds, for every layer number that attends (exit blocks included, under their
own number ``L + num_layers``), a key and a value buffer ``[max_batch, max_len, query_groups/tp, d]``.
A forward feeds ``n >= 1`` new tokens per sequence written at ``sequence_len_offset`` (several tokens at
once is what KV recomputation needs) into the rows ``batch_idx`` of the cache (``None``: rows
``0..b-1``), so a decoding strategy can run any subset of its sequences. Keys are stored after RoPE.
Advancing ``sequence_len_offset`` is the caller's job: only it knows which layers got complete KV.
"""

from __future__ import annotations

import torch

__all__ = ["InferenceParams"]


class InferenceParams:
    def __init__(self, max_batch_size: int, max_sequence_length: int):
        if max_batch_size < 1 or max_sequence_length < 1:
            raise ValueError(
                f"InferenceParams needs a positive batch ({max_batch_size}) and length ({max_sequence_length})"
            )
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length
        self.sequence_len_offset = 0
        self.batch_idx: torch.Tensor | None = None
        self.key_value_memory_dict: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def reset(self) -> None:
        """Start a new batch of prompts (buffers are kept, contents are overwritten as decoding goes)."""
        self.sequence_len_offset = 0
        self.batch_idx = None

    def rows(self, b: int, device) -> torch.Tensor:
        if self.batch_idx is None:
            if b > self.max_batch_size:
                raise ValueError(f"batch of {b} exceeds the cache's max_batch_size {self.max_batch_size}")
            return torch.arange(b, device=device)
        idx = self.batch_idx.to(device=device, dtype=torch.long)
        if idx.numel() != b:
            raise ValueError(f"batch_idx has {idx.numel()} rows but the forward carries {b} sequences")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.max_batch_size):
            raise ValueError(f"batch_idx {idx.tolist()} outside the cache's 0..{self.max_batch_size - 1}")
        return idx

    def update(self, layer_number: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new ``key``/``value`` ``[s_new, b, groups, d]`` of ``layer_number`` at the current
        offset; return every cached key/value of these sequences up to the new end, ``[s_total, b, g, d]``."""
        s_new, b = key.shape[0], key.shape[1]
        start, end = self.sequence_len_offset, self.sequence_len_offset + s_new
        if end > self.max_sequence_length:
            raise ValueError(
                f"KV cache overflow: offset {start} + {s_new} new tokens > max_sequence_length "
                f"{self.max_sequence_length}; allocate a longer cache"
            )
        shape = (self.max_batch_size, self.max_sequence_length, *key.shape[2:])
        buffers = self.key_value_memory_dict.get(layer_number)
        if buffers is None or buffers[0].shape != shape or buffers[0].dtype != key.dtype:
            buffers = tuple(torch.zeros(shape, dtype=key.dtype, device=key.device) for _ in range(2))
            self.key_value_memory_dict[layer_number] = buffers
        k_buf, v_buf = buffers
        rows = self.rows(b, key.device)
        k_buf[rows, start:end] = key.transpose(0, 1)
        v_buf[rows, start:end] = value.transpose(0, 1)
        return k_buf[rows, :end].transpose(0, 1), v_buf[rows, :end].transpose(0, 1)
