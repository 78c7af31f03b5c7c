"""Random-number streams for tensor parallelism and activation checkpointing that replays them.

* :class:`RNGStatesTracker` keeps named generator states and swaps them in with ``fork(name)``: the CPU
  generator always, the current CUDA device's generator too when CUDA is in use. Device-agnostic, so the
  same model code drops out the same way on a laptop and on a cluster. A stream's CUDA state is seeded
  from the stream's own seed the first time CUDA is in use when it is forked (or its states are read), on
  the device current then -- not only when CUDA happened to be initialised as the tracker was built: a
  fork without a CUDA state of its own would draw from the default CUDA generator and then rewind it, so
  the next default draws would repeat the stream's (correlated dropout masks).
* :func:`model_parallel_seed` seeds the default generators identically on every tp rank (dropout on
  replicated activations must agree across tp) and registers the ``"model-parallel-rng"`` stream seeded
  per tp rank (dropout inside tp-partitioned activations must differ between shards).
* :func:`checkpoint` recomputes a function in backward after restoring the default CPU/CUDA states AND
  the tracker's states, so every dropout mask of the recompute equals the first forward's. Its
  parameters get their gradients whether or not an input needs one (see :func:`checkpoint`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable

import torch

from megatron.core.parallel_state import ParallelState

__all__ = ["RNGStatesTracker", "MODEL_PARALLEL_RNG", "model_parallel_seed", "checkpoint"]

MODEL_PARALLEL_RNG = "model-parallel-rng"
# Megatron's offset between the data-parallel seed and the tp seeds, so the streams never coincide.
_TP_SEED_OFFSET = 2718


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _get_default_states() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if _cuda_in_use():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _seeded_cuda_state(seed: int) -> torch.Tensor:
    """The current device's generator state after seeding it with ``seed``; the generator itself is put back
    (other streams must not move)."""
    saved = torch.cuda.get_rng_state()
    torch.cuda.manual_seed(seed)
    state = torch.cuda.get_rng_state()
    torch.cuda.set_rng_state(saved)
    return state


def _set_default_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and _cuda_in_use():
        torch.cuda.set_rng_state(states["cuda"])


class RNGStatesTracker:
    """Named generator states; ``fork(name)`` runs a block on that stream and advances it."""

    def __init__(self) -> None:
        self._states: dict[str, dict[str, torch.Tensor]] = {}
        self._seeds: set[int] = set()

    def reset(self) -> None:
        self._states.clear()
        self._seeds.clear()

    def names(self) -> list[str]:
        return sorted(self._states)

    def add(self, name: str, seed: int) -> None:
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists")
        if seed in self._seeds:
            raise ValueError(f"seed {seed} already used by another RNG stream; streams must differ")
        self._states[name] = {"cpu": torch.Generator().manual_seed(seed).get_state()}
        self._seeds.add(seed)
        self._add_cuda_states()

    def _add_cuda_states(self) -> None:
        """Give every stream its CUDA state once CUDA is in use (idempotent)."""
        if not _cuda_in_use():
            return
        for states in self._states.values():
            if "cuda" not in states:
                # The CPU state carries the stream's seed (also after set_states from a checkpoint).
                seed = torch.Generator().set_state(states["cpu"]).initial_seed()
                states["cuda"] = _seeded_cuda_state(seed)

    def get_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """Copies of every stream's states (for checkpoints and recompute)."""
        self._add_cuda_states()
        return {name: {k: v.clone() for k, v in st.items()} for name, st in self._states.items()}

    def set_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        self._states = {name: {k: v.clone() for k, v in st.items()} for name, st in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        if name not in self._states:
            raise KeyError(f"RNG stream {name!r} was never added; call model_parallel_seed(seed, state) first")
        self._add_cuda_states()
        saved = _get_default_states()
        _set_default_states(self._states[name])
        try:
            yield
        finally:
            self._states[name] = _get_default_states()
            _set_default_states(saved)


def model_parallel_seed(seed: int, state: ParallelState) -> RNGStatesTracker:
    """Seed the default generators with ``seed`` and return a tracker whose ``"model-parallel-rng"``
    stream is seeded ``seed + 2718 + tp_rank`` (Megatron's scheme). The caller adds any per-stage offset
    (Megatron uses ``seed + 100 * pp_rank``) before calling."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {seed!r}")
    torch.manual_seed(seed)
    tracker = RNGStatesTracker()
    tracker.add(MODEL_PARALLEL_RNG, seed + _TP_SEED_OFFSET + state.tp_rank)
    return tracker


class _Checkpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, function, tracker, anchor, *args):
        ctx.function, ctx.tracker = function, tracker
        ctx.rng = _get_default_states()
        ctx.tracker_states = tracker.get_states() if tracker is not None else None
        tensor_idx = [i for i, a in enumerate(args) if torch.is_tensor(a)]
        ctx.tensor_idx = tensor_idx
        ctx.others = [None if torch.is_tensor(a) else a for a in args]
        ctx.save_for_backward(*(args[i] for i in tensor_idx))
        with torch.no_grad():
            return function(*args)

    @staticmethod
    def backward(ctx, *grads):
        args = list(ctx.others)
        for i, t in zip(ctx.tensor_idx, ctx.saved_tensors):
            args[i] = t.detach().requires_grad_(t.requires_grad)
        # Replay the forward's streams, then put back the ones the surrounding backward is using.
        outer = _get_default_states()
        outer_tracker = ctx.tracker.get_states() if ctx.tracker is not None else None
        _set_default_states(ctx.rng)
        if ctx.tracker is not None:
            ctx.tracker.set_states(ctx.tracker_states)
        try:
            with torch.enable_grad():
                outputs = ctx.function(*args)
        finally:
            _set_default_states(outer)
            if ctx.tracker is not None:
                ctx.tracker.set_states(outer_tracker)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads)
                 if torch.is_tensor(o) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        input_grads = [args[i].grad if i in ctx.tensor_idx else None for i in range(len(args))]
        return (None, None, None, *input_grads)


def checkpoint(function: Callable[..., Any], *args: Any, tracker: RNGStatesTracker | None = None,
               params: Iterable[torch.Tensor] = ()):
    """``function(*args)`` without keeping its activations; backward recomputes it under the same RNG
    states (default generators and, when given, ``tracker``'s streams). ``function`` must return a tensor
    or a tuple of tensors.

    ``params``: the parameters ``function`` uses. Autograd reaches the recompute only through an input
    that requires grad; when none does (a pipeline stage's received activation that sends no gradient
    back, the output of a frozen embedding under EE-Tuning) but a parameter does, a zero-size anchor
    input that requires grad is added, or those parameters would silently get no gradient."""
    anchor = None
    if torch.is_grad_enabled() and any(p.requires_grad for p in params) and not any(
            torch.is_tensor(a) and a.requires_grad for a in args):
        anchor = torch.empty(0, requires_grad=True)
    return _Checkpoint.apply(function, tracker, anchor, *args)
