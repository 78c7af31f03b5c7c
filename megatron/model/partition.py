"""Which transformer layers, exits, embedding and head each (pipeline stage, virtual chunk) owns.

Pure: the model, the schedule generators and the checkpoint code all read a :class:`Partition` instead
of recomputing the split. Layers are 1-based global numbers. With ``vpp`` chunks per stage the order is
Megatron's interleaving: chunk ``c`` of stage ``s`` owns the ``(c * pp + s)``-th block of consecutive
layers; a stage's block size is its layer count divided by ``vpp``. Exits belong to the chunk owning
their layer (a pre-exit at layer L too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from megatron.errors import ConfigError

__all__ = ["ChunkSpec", "Partition", "partition", "LAYERS_PER_STAGE_FLAG"]

# Uneven splits are not a Megatron flag; this is the name our CLI uses for them.
LAYERS_PER_STAGE_FLAG = "--layers-per-stage"


@dataclass(frozen=True)
class ChunkSpec:
    """What one (stage, chunk) model owns."""

    stage: int
    chunk: int
    layers: tuple[int, ...]
    exits: tuple[int, ...]
    has_embedding: bool
    has_head: bool

    @property
    def first_layer(self) -> int | None:
        return self.layers[0] if self.layers else None


@dataclass(frozen=True)
class Partition:
    num_layers: int
    pp: int
    vpp: int
    exit_layers: tuple[int, ...]
    layers_per_stage: tuple[int, ...]
    specs: tuple[tuple[ChunkSpec, ...], ...]  # [stage][chunk]

    def spec(self, stage: int, chunk: int = 0) -> ChunkSpec:
        if not (0 <= stage < self.pp and 0 <= chunk < self.vpp):
            raise IndexError(f"(stage {stage}, chunk {chunk}) outside pp={self.pp}, vpp={self.vpp}")
        return self.specs[stage][chunk]

    def all_specs(self) -> list[ChunkSpec]:
        """Every chunk in model order (the order the hidden state flows through them)."""
        return [self.specs[s][c] for c in range(self.vpp) for s in range(self.pp)]

    def owner(self, layer: int) -> ChunkSpec:
        for spec in self.all_specs():
            if layer in spec.layers:
                return spec
        raise ValueError(f"layer {layer} outside 1..{self.num_layers}")

    @property
    def exit_stages(self) -> list[int]:
        """Sorted stages owning at least one exit."""
        return sorted({self.owner(layer).stage for layer in self.exit_layers})

    @property
    def exit_positions(self) -> list[int]:
        """The pipeline position ``chunk * pp + stage`` of each exit, sorted (a position holding two
        exits appears twice): the schedules' ``exit_positions``."""
        return sorted(self.owner(layer).chunk * self.pp + self.owner(layer).stage for layer in self.exit_layers)


def _stage_counts(num_layers: int, pp: int, vpp: int, layers_per_stage: Sequence[int] | None) -> tuple[int, ...]:
    if layers_per_stage is None:
        if num_layers % (pp * vpp) != 0:
            what = "--pipeline-model-parallel-size" if vpp == 1 else (
                "--pipeline-model-parallel-size x virtual chunks (--num-layers-per-virtual-pipeline-stage)")
            raise ConfigError(
                f"--num-layers ({num_layers}) is not divisible by {what} ({pp * vpp}); change the sizes or "
                f"give an uneven split with {LAYERS_PER_STAGE_FLAG}"
            )
        return (num_layers // pp,) * pp
    counts = tuple(layers_per_stage)
    if len(counts) != pp:
        raise ConfigError(
            f"{LAYERS_PER_STAGE_FLAG} has {len(counts)} entries but --pipeline-model-parallel-size is {pp}"
        )
    if any(not isinstance(n, int) or n < 0 for n in counts):
        raise ConfigError(f"{LAYERS_PER_STAGE_FLAG} entries must be integers >= 0, got {list(counts)}")
    if sum(counts) != num_layers:
        raise ConfigError(
            f"{LAYERS_PER_STAGE_FLAG} {list(counts)} sums to {sum(counts)}, not --num-layers ({num_layers})"
        )
    bad = [n for n in counts if n % vpp != 0]
    if bad:
        raise ConfigError(
            f"{LAYERS_PER_STAGE_FLAG} {list(counts)}: every stage's count must be divisible by the {vpp} "
            "virtual chunks (--num-layers-per-virtual-pipeline-stage)"
        )
    return counts


def partition(
    num_layers: int,
    pp: int,
    vpp: int = 1,
    exit_layers: Sequence[int] = (),
    layers_per_stage: Sequence[int] | None = None,
) -> Partition:
    """Split ``num_layers`` over ``pp`` stages x ``vpp`` chunks (evenly, or by ``layers_per_stage``)."""
    vpp = vpp or 1
    if num_layers < 1:
        raise ConfigError(f"--num-layers must be positive, got {num_layers}")
    if pp < 1 or vpp < 1:
        raise ConfigError(f"--pipeline-model-parallel-size ({pp}) and virtual chunks ({vpp}) must be >= 1")
    counts = _stage_counts(num_layers, pp, vpp, layers_per_stage)
    exits = tuple(exit_layers)
    for layer in exits:
        if not 1 <= layer <= num_layers:
            raise ConfigError(f"--exit-layer-nums: layer {layer} is outside 1..--num-layers ({num_layers})")
    # Blocks in model order: block b = c * pp + s holds counts[s] / vpp consecutive layers.
    start, layers_of = 1, {}
    for c in range(vpp):
        for s in range(pp):
            size = counts[s] // vpp
            layers_of[s, c] = tuple(range(start, start + size))
            start += size
    specs = tuple(
        tuple(
            ChunkSpec(
                stage=s,
                chunk=c,
                layers=layers_of[s, c],
                exits=tuple(e for e in sorted(exits) if e in layers_of[s, c]),
                has_embedding=(s == 0 and c == 0),
                has_head=(s == pp - 1 and c == vpp - 1),
            )
            for c in range(vpp)
        )
        for s in range(pp)
    )
    return Partition(num_layers, pp, vpp, exits, counts, specs)
