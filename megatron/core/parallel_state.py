"""Parallel layout: validated dimensions, the pure rank grid, and the process groups of one rank.

Three layers, from pure to stateful:

* :class:`ParallelDims` -- the sizes (tp, pp, dp, vpp), validated against the world size with errors that
  name the command-line flag and the fix. No processes involved.
* :class:`RankGrid` -- Megatron's rank order (tp fastest, then dp, then pp) as pure functions: the
  coordinates of a rank and the member lists of every tp / dp / pp / model-parallel group.
* :class:`ParallelState` -- built once by the entry point after ``torch.distributed`` is initialised;
  holds this rank's coordinates, its groups and its device, and is passed down to the core modules (no
  module-level globals). ``ParallelState.single()`` is the one-process state used by unit tests and tools.

Which stages hold exits and which keep a copy of a tied output projection is the partition's and the
model's knowledge (``Partition.exit_stages``, ``megatron.model.tied_weight_holders``); the groups over
such stages (``RankGrid.stage_groups``, ``ParallelState.new_stage_group``) are always built from *sorted*
ranks (EE-LLM built the tied-embedding group from a set and could hang).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.distributed as dist

__all__ = [
    "ParallelDims",
    "RankGrid",
    "ParallelState",
    "default_backend",
    "init_distributed",
    "local_cuda_device",
    "ParallelConfigError",
]


class ParallelConfigError(ValueError):
    """A parallel layout that cannot work; the message names the flag and the fix."""


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the parallel axes. ``tp * pp * dp`` is the world size; ``vpp`` is the number of model
    chunks per pipeline stage (``None`` or 1 means no interleaving)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: int | None = None

    def __post_init__(self) -> None:
        for name, flag, value in (
            ("tp", "--tensor-model-parallel-size", self.tp),
            ("pp", "--pipeline-model-parallel-size", self.pp),
            ("dp", "data-parallel size (world size / (tp * pp))", self.dp),
        ):
            if not isinstance(value, int) or value < 1:
                raise ParallelConfigError(f"{flag} must be a positive integer, got {value!r} ({name})")
        if self.vpp is not None:
            if not isinstance(self.vpp, int) or self.vpp < 1:
                raise ParallelConfigError(
                    f"virtual pipeline size must be a positive integer, got {self.vpp!r}; "
                    "set --num-layers-per-virtual-pipeline-stage so that it divides the layers per stage"
                )
            if self.vpp > 1 and self.pp == 1:
                raise ParallelConfigError(
                    "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1; "
                    "drop the flag or raise the pipeline size"
                )

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def chunks(self) -> int:
        """Model chunks per stage (1 without interleaving)."""
        return self.vpp or 1

    @classmethod
    def from_world(cls, world_size: int, tp: int = 1, pp: int = 1, vpp: int | None = None) -> "ParallelDims":
        """Derive dp from the world size, refusing sizes that do not divide it."""
        if world_size < 1:
            raise ParallelConfigError(f"world size must be positive, got {world_size}")
        if tp < 1 or pp < 1:
            raise ParallelConfigError(
                f"--tensor-model-parallel-size ({tp}) and --pipeline-model-parallel-size ({pp}) must be >= 1"
            )
        if world_size % (tp * pp) != 0:
            raise ParallelConfigError(
                f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) x "
                f"--pipeline-model-parallel-size ({pp}) = {tp * pp}; launch a multiple of {tp * pp} processes "
                "or change the two sizes"
            )
        return cls(tp=tp, pp=pp, dp=world_size // (tp * pp), vpp=vpp)


@dataclass(frozen=True)
class RankGrid:
    """Megatron's rank order: ``rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank``.

    tp groups are contiguous ranks (they share a node's fast links), dp groups stride by tp, pipeline
    groups stride by ``tp * dp``.
    """

    dims: ParallelDims

    def coords(self, rank: int) -> tuple[int, int, int]:
        """``(tp_rank, dp_rank, pp_rank)`` of a global rank."""
        d = self.dims
        if not 0 <= rank < d.world_size:
            raise ValueError(f"rank {rank} outside world of size {d.world_size}")
        return rank % d.tp, (rank // d.tp) % d.dp, rank // (d.tp * d.dp)

    def rank(self, tp: int, dp: int, pp: int) -> int:
        d = self.dims
        return pp * (d.dp * d.tp) + dp * d.tp + tp

    def tp_groups(self) -> list[list[int]]:
        d = self.dims
        return [[self.rank(t, r, p) for t in range(d.tp)] for p in range(d.pp) for r in range(d.dp)]

    def dp_groups(self) -> list[list[int]]:
        d = self.dims
        return [[self.rank(t, r, p) for r in range(d.dp)] for p in range(d.pp) for t in range(d.tp)]

    def pp_groups(self) -> list[list[int]]:
        d = self.dims
        return [[self.rank(t, r, p) for p in range(d.pp)] for r in range(d.dp) for t in range(d.tp)]

    def mp_groups(self) -> list[list[int]]:
        """Model-parallel groups: every tp and pp rank of one data-parallel replica."""
        d = self.dims
        return [[self.rank(t, r, p) for p in range(d.pp) for t in range(d.tp)] for r in range(d.dp)]

    def stage_groups(self, stages: Iterable[int]) -> list[list[int]]:
        """For each pipeline, the ranks of the given stages, sorted (e.g. the tied-embedding holders)."""
        stages = sorted(set(stages))
        return [[pipe[s] for s in stages] for pipe in self.pp_groups()]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def local_cuda_device(rank: int) -> torch.device:
    """The GPU this process drives: ``LOCAL_RANK`` (torchrun), else the global rank modulo the GPUs seen."""
    local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
    return torch.device("cuda", local)


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> None:
    """Initialise the default process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``). A no-op when already initialised or when run as one plain process.

    Under NCCL the process first selects its GPU and binds the group to it (``device_id``): NCCL then
    builds the world communicator now, collectively, on the right GPU, instead of guessing the device at
    the first operation (every rank on GPU 0 if none was set)."""
    if dist.is_initialized():
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and "MASTER_ADDR" not in os.environ:
        return
    import datetime

    backend = backend or default_backend()
    rank = int(os.environ.get("RANK", "0"))
    extra = {}
    if backend == "nccl":
        device = local_cuda_device(rank)
        torch.cuda.set_device(device)
        extra["device_id"] = device
    dist.init_process_group(
        backend=backend,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
        **extra,
    )


def _warm_up(device: torch.device) -> None:
    """One all-reduce on the world group, joined by every rank. PyTorch documents a batched P2P as the
    *first* operation of an NCCL group as undefined unless every rank of the group takes part (it may
    hang); a pipeline's first exchange involves two stages only and, with mock data and no checkpoint to
    load, nothing else communicates before it. Cheap on gloo too, so both backends run the same order."""
    dist.all_reduce(torch.zeros(1, device=device))


@dataclass
class ParallelState:
    """This rank's place in the grid and its process groups. ``None`` groups mean size 1 (no collective)."""

    dims: ParallelDims
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = "gloo"
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    mp_group: dist.ProcessGroup | None = None
    # Global ranks of this rank's pipeline, stage order.
    pp_ranks: tuple[int, ...] = (0,)
    # Global ranks of this rank's tp / dp groups (useful for broadcasts with a global src).
    tp_ranks: tuple[int, ...] = (0,)
    dp_ranks: tuple[int, ...] = (0,)

    # ---------------------------------------------------------------- construction
    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> "ParallelState":
        """One process, every axis of size 1; no torch.distributed needed."""
        return cls(dims=ParallelDims(), device=torch.device(device))

    @classmethod
    def build(
        cls,
        dims: ParallelDims,
        backend: str | None = None,
        device: str | torch.device | None = None,
    ) -> "ParallelState":
        """Create every group (all ranks must call this, in the same order). ``torch.distributed`` must be
        initialised with ``world_size == dims.world_size``."""
        if not dist.is_initialized():
            if dims.world_size == 1:
                return cls.single(device or "cpu")
            raise RuntimeError("torch.distributed is not initialised; call init_distributed() first")
        world = dist.get_world_size()
        if world != dims.world_size:
            raise ParallelConfigError(
                f"launched {world} processes but tp x pp x dp = {dims.tp} x {dims.pp} x {dims.dp} = "
                f"{dims.world_size}; change --nproc_per_node / --nnodes or the parallel sizes"
            )
        rank = dist.get_rank()
        backend = backend or dist.get_backend()
        if device is None:
            if backend == "nccl":
                device = local_cuda_device(rank)
                torch.cuda.set_device(device)
            else:
                device = torch.device("cpu")
        grid = RankGrid(dims)
        state = cls(dims=dims, rank=rank, device=torch.device(device), backend=backend)
        for attr, groups in (
            ("tp", grid.tp_groups()),
            ("dp", grid.dp_groups()),
            ("pp", grid.pp_groups()),
            ("mp", grid.mp_groups()),
        ):
            mine = _new_groups(groups, rank)
            setattr(state, f"{attr}_group", mine[0])
            if attr in ("tp", "dp", "pp"):
                setattr(state, f"{attr}_ranks", tuple(mine[1]))
        _warm_up(state.device if backend == "nccl" else torch.device("cpu"))
        return state

    def new_stage_group(self, stages: Iterable[int]) -> dist.ProcessGroup | None:
        """A group over the given pipeline stages of this rank's pipeline (ranks sorted), created
        collectively for every pipeline. Returns ``None`` if this rank is not among the stages or the
        group would have one member. Every rank must call it with the same stages."""
        stages = sorted(set(stages))
        if not dist.is_initialized() or self.dims.world_size == 1:
            return None
        group, members = _new_groups(RankGrid(self.dims).stage_groups(stages), self.rank)
        return group if self.rank in members and len(members) > 1 else None

    # ---------------------------------------------------------------- coordinates
    @property
    def grid(self) -> RankGrid:
        return RankGrid(self.dims)

    @property
    def tp_rank(self) -> int:
        return self.grid.coords(self.rank)[0]

    @property
    def dp_rank(self) -> int:
        return self.grid.coords(self.rank)[1]

    @property
    def pp_rank(self) -> int:
        return self.grid.coords(self.rank)[2]

    @property
    def tp(self) -> int:
        return self.dims.tp

    @property
    def pp(self) -> int:
        return self.dims.pp

    @property
    def dp(self) -> int:
        return self.dims.dp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1

    @property
    def next_rank(self) -> int | None:
        """Global rank of the next stage (``None`` on the last stage)."""
        return None if self.is_last_stage else self.pp_ranks[self.pp_rank + 1]

    @property
    def prev_rank(self) -> int | None:
        """Global rank of the previous stage (``None`` on the first stage)."""
        return None if self.is_first_stage else self.pp_ranks[self.pp_rank - 1]

    def stage_rank(self, stage: int) -> int:
        """Global rank of ``stage`` in this rank's pipeline."""
        return self.pp_ranks[stage]


def _new_groups(groups: list[list[int]], rank: int) -> tuple[dist.ProcessGroup | None, list[int]]:
    """Create one group per member list (collectively, same order on every rank); return this rank's
    group (``None`` for a one-member group) and its member list."""
    mine: tuple[dist.ProcessGroup | None, list[int]] = (None, [rank])
    for members in groups:
        group = dist.new_group(members) if len(members) > 1 else None
        if rank in members:
            mine = (group, members)
    return mine
