"""Random-generator states in checkpoints: capture every stream of a rank, restore them on resume.

One rank's entry (Megatron's key names): ``random_rng_state`` (Python), ``np_rng_state`` (numpy),
``torch_rng_state`` (CPU), ``cuda_rng_state`` (current CUDA device, when CUDA is in use) and
``rng_tracker_states`` (the tensor-parallel :class:`~megatron.core.tensor_parallel.random.RNGStatesTracker`
streams). A checkpoint's ``rng_state`` is the list of these entries over the data-parallel ranks of one
(tp, pp) coordinate, so every rank of the world resumes with its own streams.
"""

from __future__ import annotations

import logging
import random

import numpy as np
import torch
import torch.distributed as dist

from megatron.checkpoint.layout import CheckpointError

__all__ = ["capture_rng_states", "gather_rng_states", "restore_rng_states"]

log = logging.getLogger(__name__)


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def capture_rng_states(rng_tracker=None) -> dict:
    """This rank's generator states."""
    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if _cuda_in_use() else None,
        "rng_tracker_states": rng_tracker.get_states() if rng_tracker is not None else None,
    }


def gather_rng_states(local: dict, dp_group) -> list[dict]:
    """Every data-parallel rank's states, in dp-rank order (collective over ``dp_group``)."""
    if dp_group is None:
        return [local]
    states: list = [None] * dist.get_world_size(dp_group)
    dist.all_gather_object(states, local, group=dp_group)
    return states


def restore_rng_states(saved: list[dict] | dict, dp_rank: int, rng_tracker, path: str) -> None:
    """Put back the states this dp rank saved. With a changed data-parallel size a rank beyond the saved
    list takes entry 0 (exact continuation is impossible then anyway)."""
    entries = saved if isinstance(saved, list) else [saved]
    if not entries:
        raise CheckpointError(f"{path} has an empty rng_state; resume with --no-load-rng")
    if dp_rank >= len(entries):
        log.warning("%s holds RNG states of %d data-parallel ranks; dp rank %d takes those of rank 0",
                    path, len(entries), dp_rank)
    state = entries[dp_rank] if dp_rank < len(entries) else entries[0]
    try:
        random.setstate(state["random_rng_state"])
        np.random.set_state(state["np_rng_state"])
        torch.set_rng_state(state["torch_rng_state"])
        if state.get("cuda_rng_state") is not None and _cuda_in_use():
            torch.cuda.set_rng_state(state["cuda_rng_state"])
        if rng_tracker is not None:
            if not state.get("rng_tracker_states"):
                raise CheckpointError(f"{path} has no tensor-parallel RNG tracker states; resume with --no-load-rng")
            rng_tracker.set_states(state["rng_tracker_states"])
    except KeyError as e:
        raise CheckpointError(f"{path} has no {e.args[0]} in its rng_state; resume with --no-load-rng") from None
    except (AttributeError, TypeError, ValueError, RuntimeError) as e:
        # e.g. EE-LLM's tracker holds one CUDA generator state per stream, ours a {device: state} dict.
        raise CheckpointError(f"{path} holds RNG states this run cannot restore ({type(e).__name__}: {e}; written "
                              "by another program or on another device?); resume with --no-load-rng") from None
