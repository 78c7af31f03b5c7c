"""Distributed-optimizer state in checkpoints: gather the dp shards into ``distrib_optim.pt``, reshard on load.

Each data-parallel rank's :class:`~megatron.optimizer.distrib_optimizer.DistributedOptimizer` state dict
covers the flat ranges ``layout = [(param_index, lo, hi), ...]`` of its reduce-scatter shard. Data-parallel
rank 0 of every (tp, pp) coordinate collects the shards of its dp group and writes them, in dp-rank order,
into one ``distrib_optim.pt`` beside the model file (the file name Megatron uses).

Loading at the saved dp size hands each rank its own shard. At another dp size the shards are merged into
whole flat parameters and cut along the new rank's layout (:func:`reshard`): Adam/SGD state and fp32
masters are element-wise, so the result is exactly the state the new shard would have had.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.checkpoint.layout import CheckpointError

__all__ = ["to_cpu", "gather_shards", "reshard"]


def to_cpu(obj):
    """A copy of a nested state with every tensor on the CPU (detached)."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def gather_shards(shard: dict, dp_group, dp_ranks: tuple[int, ...]) -> list[dict] | None:
    """Every dp rank's ``shard`` on dp rank 0 (in dp order); ``None`` on the other ranks."""
    if dp_group is None:
        return [shard]
    dst = dp_ranks[0]
    out = [None] * len(dp_ranks) if dist.get_rank() == dst else None
    dist.gather_object(shard, out, dst=dst, group=dp_group)
    return out


def _flat_ids(torch_state: dict | None) -> list[int]:
    """The torch optimizer's parameter ids in slot order (groups follow slot order, see optimizer.py)."""
    if torch_state is None:
        return []
    return [pid for g in torch_state["param_groups"] for pid in g["params"]]


def _merge(shards: list[dict], has_copy: dict[int, bool]) -> tuple[dict, dict, dict]:
    """Per parameter index: ``{key: flat tensor or scalar}`` optimizer state, the flat fp32 master, and its
    numel (the furthest ``hi`` seen)."""
    state: dict[int, dict] = {}
    masters: dict[int, list] = {}
    numel: dict[int, int] = {}
    for sd in shards:
        torch_state = sd.get("optimizer")
        ids = _flat_ids(torch_state)
        copies = iter(sd.get("fp32_from_fp16_params") or [])
        for k, (index, lo, hi) in enumerate(sd["layout"]):
            numel[index] = max(numel.get(index, 0), hi)
            if has_copy.get(index, False):
                masters.setdefault(index, []).append((lo, hi, next(copies)))
            per_param = torch_state["state"].get(ids[k]) if torch_state is not None and k < len(ids) else None
            for key, value in (per_param or {}).items():
                state.setdefault(index, {}).setdefault(key, []).append((lo, hi, value))
    return state, masters, numel


def _assemble(pieces: list, total: int):
    """One flat tensor from ``(lo, hi, piece)``; a scalar (e.g. Adam's ``step``) is shared, so taken once."""
    lo, hi, first = pieces[0]
    if not (torch.is_tensor(first) and first.dim() >= 1 and first.numel() == hi - lo):
        return first
    full = torch.empty(total, dtype=first.dtype)
    covered = 0
    for lo, hi, piece in pieces:
        full[lo:hi] = piece.reshape(-1)
        covered += hi - lo
    if covered != total:
        raise CheckpointError(f"distributed-optimizer shards cover {covered} of {total} elements of a parameter")
    return full


def reshard(shards: list[dict], target: dict, has_copy: dict[int, bool]) -> dict:
    """The state dict for a rank whose own (freshly built) ``target`` state dict gives its layout.

    ``has_copy[param_index]``: whether that parameter keeps an fp32 master copy (half precision)."""
    state, masters, numel = _merge(shards, has_copy)
    full_state = {i: {k: _assemble(v, numel[i]) for k, v in kv.items()} for i, kv in state.items()}
    full_masters = {i: _assemble(v, numel[i]) for i, v in masters.items()}
    new_torch = None
    if target.get("optimizer") is not None:
        ids = _flat_ids(target["optimizer"])
        per_param = {}
        for pid, (index, lo, hi) in zip(ids, target["layout"]):
            if index in full_state:
                per_param[pid] = {k: v[lo:hi].clone() if torch.is_tensor(v) and v.dim() >= 1 else v
                                  for k, v in full_state[index].items()}
        new_torch = {"state": per_param, "param_groups": target["optimizer"]["param_groups"]}
    copies = [full_masters[index][lo:hi].clone() for index, lo, hi in target["layout"] if has_copy.get(index, False)]
    first = shards[0]
    return {**target, "optimizer": new_torch, "fp32_from_fp16_params": copies,
            "grad_scaler": first.get("grad_scaler"), "num_skipped_iters": first.get("num_skipped_iters", 0)}
