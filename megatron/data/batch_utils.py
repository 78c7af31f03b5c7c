"""Turning a token batch into model inputs: broadcast inside a tensor-parallel group, masks, positions.

Only tensor-parallel rank 0 reads data; ``broadcast_data`` sends the batch (shapes first, then one flat
buffer) to the other ranks of the group. ``get_ltor_masks_and_position_ids`` follows Megatron's
conventions: the attention mask is **boolean with True meaning "masked out"** (may not attend), shape
``[1 or b, 1, s, s]``; the loss mask is float (1 = counts toward the loss); position ids are int64 ``[b, s]``.
``model_inputs`` makes one microbatch's inputs from its token ids; the training loop calls it per
microbatch as the schedule consumes them (see ``training/loop.py``).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.distributed as dist

__all__ = ["broadcast_data", "get_ltor_masks_and_position_ids", "model_inputs"]

_MAX_DIMS = 8


def _group_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_data(keys: Sequence[str], data: Mapping | None, tp_group, src_global_rank: int,
                   dtype: torch.dtype = torch.int64) -> dict[str, torch.Tensor]:
    """Return ``{key: tensor}`` on every rank of ``tp_group``; only ``src_global_rank`` reads ``data``.

    Every tensor is sent as ``dtype``. A ``tp_group`` of None means a group of one: ``data`` is converted
    and returned as is."""
    if tp_group is None:
        return {k: torch.as_tensor(data[k]).to(dtype) for k in keys}
    device = _group_device(tp_group)
    is_src = dist.get_rank() == src_global_rank
    shapes = torch.zeros(len(keys), _MAX_DIMS + 1, dtype=torch.int64, device=device)
    if is_src:
        tensors = [torch.as_tensor(data[k]) for k in keys]
        for i, (k, t) in enumerate(zip(keys, tensors)):
            if t.dim() > _MAX_DIMS:
                raise ValueError(f"broadcast_data: {k!r} has {t.dim()} dims, at most {_MAX_DIMS} are supported")
            shapes[i, 0] = t.dim()
            shapes[i, 1:1 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    dist.broadcast(shapes, src_global_rank, group=tp_group)
    dims = [tuple(int(x) for x in row[1:1 + int(row[0])]) for row in shapes.cpu()]
    numels = [int(torch.Size(d).numel()) for d in dims]
    if is_src:
        # non_blocking: a pinned batch (the loader pins under CUDA) is copied without stalling the host.
        flat = torch.cat([t.reshape(-1).to(device=device, dtype=dtype, non_blocking=True) for t in tensors])
    else:
        flat = torch.empty(sum(numels), dtype=dtype, device=device)
    dist.broadcast(flat, src_global_rank, group=tp_group)
    out, start = {}, 0
    for k, d, n in zip(keys, dims, numels):
        out[k] = flat[start:start + n].view(d)
        start += n
    return out


def get_ltor_masks_and_position_ids(tokens: torch.Tensor, eod: int, reset_position_ids: bool,
                                    reset_attention_mask: bool, eod_mask_loss: bool):
    """(attention_mask bool [b or 1, 1, s, s] True = masked out, loss_mask float [b, s], position_ids [b, s]).

    ``reset_attention_mask``: tokens after an ``eod`` may not attend to tokens up to and including it.
    ``reset_position_ids``: positions restart at 0 after each ``eod``. ``eod_mask_loss``: no loss where
    the input token is ``eod``."""
    b, s = tokens.shape
    mask_batch = b if reset_attention_mask else 1
    allowed = torch.ones(mask_batch, 1, s, s, dtype=torch.bool, device=tokens.device).tril()
    loss_mask = torch.ones(b, s, dtype=torch.float, device=tokens.device)
    if eod_mask_loss:
        loss_mask[tokens == eod] = 0.0
    position_ids = torch.arange(s, dtype=torch.long, device=tokens.device).unsqueeze(0).repeat(b, 1)
    if reset_position_ids or reset_attention_mask:
        for row in range(b):
            prev = 0
            for i in torch.nonzero(tokens[row] == eod).flatten().tolist():
                if reset_attention_mask:
                    allowed[row, 0, i + 1:, :i + 1] = False
                if reset_position_ids:
                    position_ids[row, i + 1:] -= i + 1 - prev
                    prev = i + 1
    return ~allowed, loss_mask, position_ids


def model_inputs(text: torch.Tensor, eod: int | None, reset_position_ids: bool = False,
                 reset_attention_mask: bool = False, eod_mask_loss: bool = False) -> dict[str, torch.Tensor]:
    """One microbatch's model inputs from its token ids ``text`` ``[b, s + 1]``: ``tokens``, ``labels``,
    ``loss_mask`` and, when documents are separated (the reset flags), ``attention_mask`` /
    ``position_ids``. ``eod`` None: the tokenizer has none (nothing is reset or masked)."""
    tokens, labels = text[:, :-1].contiguous(), text[:, 1:].contiguous()
    mask, loss_mask, positions = get_ltor_masks_and_position_ids(
        tokens, -1 if eod is None else eod, reset_position_ids, reset_attention_mask, eod_mask_loss)
    batch = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}
    if reset_attention_mask:
        batch["attention_mask"] = mask
    if reset_position_ids:
        batch["position_ids"] = positions
    return batch

