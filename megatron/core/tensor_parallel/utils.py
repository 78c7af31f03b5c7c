"""Pure sharding arithmetic for tensor parallelism: strided shard / unshard, vocab ranges, vocab padding.

No process groups here, so checkpoint conversion and resharding tools can use the same functions the
layers use to cut their weights.

Stride semantic (Megatron's): the partitioned dim is cut into ``stride * tp`` equal blocks and rank ``r``
keeps blocks ``r, r + tp, r + 2 tp, ...``. With ``stride=2`` on SwiGLU's stacked ``[W_gate; W_up]`` every
shard holds its slice of the gate projection followed by its slice of the up projection.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["divide", "shard_tensor", "unshard_tensors", "vocab_range", "pad_vocab_size"]


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    """``numerator / denominator`` as an int, refusing a remainder with a message naming ``what``."""
    if denominator < 1 or numerator % denominator != 0:
        raise ValueError(f"{what} ({numerator}) is not divisible by {denominator}")
    return numerator // denominator


def _blocks(full: torch.Tensor, dim: int, count: int) -> tuple[torch.Tensor, ...]:
    size = full.shape[dim]
    if size % count != 0:
        raise ValueError(
            f"dimension {dim} of size {size} cannot be cut into {count} equal blocks (stride x tp); "
            "choose sizes divisible by stride * --tensor-model-parallel-size"
        )
    return torch.split(full, size // count, dim=dim)


def shard_tensor(full: torch.Tensor, dim: int, tp: int, rank: int, stride: int = 1) -> torch.Tensor:
    """Rank ``rank``'s shard of ``full`` along ``dim`` (a new contiguous tensor)."""
    if not 0 <= rank < tp:
        raise ValueError(f"tp rank {rank} outside 0..{tp - 1}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    blocks = _blocks(full, dim, stride * tp)
    return torch.cat(blocks[rank::tp], dim=dim).contiguous()


def unshard_tensors(shards: Sequence[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """Exact inverse of :func:`shard_tensor`: ``shards[r]`` is rank ``r``'s shard."""
    if not shards:
        raise ValueError("unshard_tensors needs at least one shard")
    pieces = [_blocks(s, dim, stride) for s in shards]
    # Full block order is (stride index, rank): block j*tp + r lives in piece j of rank r.
    return torch.cat([pieces[r][j] for j in range(stride) for r in range(len(shards))], dim=dim)


def vocab_range(vocab_size: int, tp: int, rank: int) -> tuple[int, int]:
    """``[start, end)`` of the vocab entries rank ``rank`` owns (contiguous, equal shards)."""
    per = divide(vocab_size, tp, "padded vocab size (pad it with pad_vocab_size / --make-vocab-size-divisible-by)")
    return rank * per, (rank + 1) * per


def pad_vocab_size(
    vocab_size: int, make_vocab_size_divisible_by: int, tp: int, padded_vocab_size: int | None = None
) -> int:
    """Megatron's padding: round ``vocab_size`` up to a multiple of ``make_vocab_size_divisible_by * tp``.

    An explicit ``padded_vocab_size`` wins but must hold the vocab and divide evenly over tp."""
    if vocab_size < 1:
        raise ValueError(f"vocab size must be positive, got {vocab_size}")
    if tp < 1:
        raise ValueError(f"--tensor-model-parallel-size must be >= 1, got {tp}")
    if padded_vocab_size is not None:
        if padded_vocab_size < vocab_size:
            raise ValueError(
                f"--padded-vocab-size {padded_vocab_size} is smaller than the tokenizer's vocab {vocab_size}; "
                "raise it or leave it unset to derive it from --make-vocab-size-divisible-by"
            )
        if padded_vocab_size % tp != 0:
            raise ValueError(
                f"--padded-vocab-size {padded_vocab_size} is not divisible by --tensor-model-parallel-size {tp}; "
                "pick a multiple of tp or leave it unset"
            )
        return padded_vocab_size
    if make_vocab_size_divisible_by < 1:
        raise ValueError(f"--make-vocab-size-divisible-by must be >= 1, got {make_vocab_size_divisible_by}")
    multiple = make_vocab_size_divisible_by * tp
    return -(-vocab_size // multiple) * multiple
