"""The canonical FULL model state dict and its exact split into, and merge from, per-rank dicts.

FULL state dict: every tensor unsharded, EE-LLM key names (its ``EarlyExitGPTModel.state_dict_for_save_checkpoint``,
flattened with dots) with GLOBAL indices: layer ``L``
(1-based) lives under ``language_model.encoder.layers.<L-1>.``, an untied exit projection under
``language_model.exit_output_layer.<L>.weight`` (keyed by its layer number, not by a local position), the
``exit_vocab`` buffer once (``--exit-vocab-size``), and no tied copies (``word_embeddings_for_head`` is
implied by the word embedding).

Per-rank dict: what ``model.state_dict()`` of one (stage, chunk) holds on one tp rank, i.e. Megatron's
``model`` (or ``model<chunk>``) entry: LOCAL layer indices, local exit indices ``k`` in ascending layer order,
TP shards cut exactly as Megatron (column-parallel dim 0, row-parallel dim 1, vocab on dim 0, SwiGLU's
stacked ``[W_gate; W_up]`` with stride 2, replicated norms / row-parallel biases / position embeddings) and
tied copies of the output projection on the non-first chunks that project logits, and ``exit_vocab`` on
every chunk owning an exit (identical copies).

Everything is pure slicing and concatenation, so shard -> merge is bit-exact. The checkpoint tools
(resharding, HF conversion, add-exit) and the model loader all go through this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from megatron.config import ConfigError, EarlyExitConfig, ModelConfig
from megatron.core.tensor_parallel.utils import shard_tensor, unshard_tensors
from megatron.model.partition import Partition

__all__ = [
    "ParamSpec",
    "StateDictError",
    "EMBEDDING_KEY",
    "POSITION_KEY",
    "OUTPUT_LAYER_KEY",
    "HEAD_COPY_KEY",
    "EXIT_HEAD_COPY_KEY",
    "EXIT_VOCAB_KEY",
    "layer_key",
    "exit_output_key",
    "model_arch",
    "full_state_dict_specs",
    "check_full_state_dict",
    "rank_key_map",
    "shard_state_dict",
    "merge_state_dicts",
]

EMBEDDING_KEY = "language_model.embedding.word_embeddings.weight"
POSITION_KEY = "language_model.embedding.position_embeddings.weight"
FINAL_NORM_PREFIX = "language_model.encoder.final_norm."
OUTPUT_LAYER_KEY = "language_model.output_layer.weight"
HEAD_COPY_KEY = "word_embeddings_for_head.weight"
# Our key (EE-LLM cannot tie exits to an untied output layer): a non-head exit chunk's copy of output_layer.
EXIT_HEAD_COPY_KEY = "output_layer_for_exits.weight"
# Our buffer (--exit-vocab-size): the token ids of a reduced-vocabulary exit projection, int64 [K].
EXIT_VOCAB_KEY = "exit_vocab"


class StateDictError(KeyError, ValueError):
    """A state dict that does not match the model configuration (missing / unexpected key, bad shape)."""

    def __str__(self) -> str:  # KeyError would repr() the message and hide line breaks
        return str(self.args[0]) if self.args else ""


def layer_key(layer_index: int, suffix: str) -> str:
    """``language_model.encoder.layers.<index>.<suffix>`` (global 0-based index in FULL dicts, local per rank)."""
    return f"language_model.encoder.layers.{layer_index}.{suffix}"


def exit_output_key(index: int) -> str:
    """Untied exit projection: keyed by layer number in FULL dicts, by local exit index per rank."""
    return f"language_model.exit_output_layer.{index}.weight"


@dataclass(frozen=True)
class ParamSpec:
    """One FULL tensor: its shape, how TP cuts it and which part of the model owns it.

    ``role``: 'embedding' (first chunk), 'head' (last chunk), 'layer' (the chunk owning ``layer``; the
    per-rank key is ``layer_key(local index, suffix)``), 'exit_output' (the chunk owning exit ``layer``) or
    'exit_chunks' (every chunk owning an exit, under the same key)."""

    shape: tuple[int, ...]
    tp_dim: int | None
    stride: int
    role: str
    layer: int | None = None
    suffix: str = ""


@dataclass(frozen=True)
class _Arch:
    num_layers: int
    hidden: int
    heads: int
    groups: int
    kv_channels: int
    ffn: int
    swiglu: bool
    bias: bool
    layernorm: bool
    learned_positions: bool
    max_positions: int
    tied_embeddings: bool
    padded_vocab: int
    exits: tuple[int, ...]
    exit_norm: bool
    exit_mlp: bool
    exit_block: bool
    untied_exits: bool
    exit_linear: bool
    estimator_hidden: int  # 0: no estimator
    exit_vocab_size: int


def model_arch(cfg: ModelConfig, ee: EarlyExitConfig | None = None) -> _Arch:
    """Read the fields the key table depends on from a ModelConfig and an EarlyExitConfig (None: no exits).

    The FULL dict's vocab rows are ``padded_vocab_size``, which must be fixed (not derived from a tp) so
    that one FULL dict serves every tp."""
    if cfg.padded_vocab_size is None:
        raise ConfigError(
            "ModelConfig.padded_vocab_size is unset: fix it before sharding or converting (e.g. "
            "cfg.padded_vocab_size = cfg.padded_vocab(tp)); checkpoints keep one padded vocab for every tp"
        )
    cfg.validate()
    if ee is not None:
        ee.validate(cfg.num_layers)
    return _Arch(
        num_layers=cfg.num_layers,
        hidden=cfg.hidden_size,
        heads=cfg.num_attention_heads,
        groups=cfg.query_groups,
        kv_channels=cfg.head_dim,
        ffn=cfg.ffn_size,
        swiglu=bool(cfg.swiglu),
        bias=bool(cfg.add_bias_linear),
        layernorm=cfg.normalization == "LayerNorm",
        learned_positions=cfg.position_embedding_type == "learned_absolute",
        max_positions=cfg.max_positions,
        tied_embeddings=not cfg.untie_embeddings_and_output_weights,
        padded_vocab=cfg.padded_vocab_size,
        exits=tuple(ee.exit_layer_nums) if ee is not None else (),
        exit_norm=ee is not None and bool(ee.use_exit_norm),
        exit_mlp=ee is not None and bool(ee.use_exit_mlp),
        exit_block=ee is not None and bool(ee.use_exit_block),
        untied_exits=ee is not None and bool(ee.untie_exit_output_weights),
        exit_linear=ee is not None and bool(ee.use_exit_linear),
        estimator_hidden=ee.exit_estimator_hidden if ee is not None and ee.exit_estimator else 0,
        exit_vocab_size=ee.exit_vocab_size if ee is not None and ee.exit_layer_nums else 0,
    )


# ----------------------------------------------------------------------------------------------- key table


def _norm(a: _Arch, name: str) -> dict[str, tuple]:
    out = {f"{name}.weight": ((a.hidden,), None, 1)}
    if a.layernorm:
        out[f"{name}.bias"] = ((a.hidden,), None, 1)
    return out


def _linear(a: _Arch, name: str, shape: tuple[int, int], tp_dim: int, stride: int = 1) -> dict[str, tuple]:
    out = {f"{name}.weight": (shape, tp_dim, stride)}
    if a.bias:
        # Column-parallel biases are cut like the output rows; row-parallel ones are added after the reduce.
        out[f"{name}.bias"] = ((shape[0],), 0 if tp_dim == 0 else None, stride if tp_dim == 0 else 1)
    return out


def _mlp(a: _Arch, name: str) -> dict[str, tuple]:
    up_rows = 2 * a.ffn if a.swiglu else a.ffn
    return {
        **_linear(a, f"{name}.dense_h_to_4h", (up_rows, a.hidden), 0, 2 if a.swiglu else 1),
        **_linear(a, f"{name}.dense_4h_to_h", (a.hidden, a.ffn), 1),
    }


def _block(a: _Arch, prefix: str = "") -> dict[str, tuple]:
    """A plain transformer layer; grouped QKV has (heads + 2 groups) * kv_channels rows."""
    qkv_rows = (a.heads + 2 * a.groups) * a.kv_channels
    return {
        **_norm(a, f"{prefix}input_norm"),
        **_linear(a, f"{prefix}self_attention.query_key_value", (qkv_rows, a.hidden), 0),
        **_linear(a, f"{prefix}self_attention.dense", (a.hidden, a.heads * a.kv_channels), 1),
        **_norm(a, f"{prefix}post_attention_norm"),
        **_mlp(a, f"{prefix}mlp"),
    }


def _exit_layer(a: _Arch) -> dict[str, tuple]:
    params = _block(a)
    if a.exit_mlp:
        params = {k: v for k, v in params.items() if not k.startswith("mlp.")}
        params.update(_mlp(a, "mlp.trunk"))
        params.update(_mlp(a, "mlp.branch"))
    if a.exit_norm:
        params.update(_norm(a, "exit_norm"))
    if a.exit_block:
        params.update(_block(a, "exit_block."))
    if a.exit_linear:
        params["exit_linear.weight"] = ((a.hidden, a.hidden), None, 1)
        params["exit_linear.bias"] = ((a.hidden,), None, 1)
    if a.estimator_hidden:
        width = a.estimator_hidden
        params.update({"exit_estimator.hidden.weight": ((width, a.hidden), None, 1),
                       "exit_estimator.hidden.bias": ((width,), None, 1),
                       "exit_estimator.output.weight": ((1, width), None, 1),
                       "exit_estimator.output.bias": ((1,), None, 1)})
    return params


def full_state_dict_specs(cfg: ModelConfig, ee: EarlyExitConfig | None = None) -> dict[str, ParamSpec]:
    """Every key of the FULL state dict for this configuration, in model order, with its :class:`ParamSpec`."""
    a = model_arch(cfg, ee)
    vocab = (a.padded_vocab, a.hidden)
    specs = {EMBEDDING_KEY: ParamSpec(vocab, 0, 1, "embedding")}
    if a.learned_positions:
        specs[POSITION_KEY] = ParamSpec((a.max_positions, a.hidden), None, 1, "embedding")
    plain, exit_layer = _block(a), _exit_layer(a)
    for number in range(1, a.num_layers + 1):
        for suffix, (shape, dim, stride) in (exit_layer if number in a.exits else plain).items():
            specs[layer_key(number - 1, suffix)] = ParamSpec(shape, dim, stride, "layer", number, suffix)
    for name, (shape, dim, stride) in _norm(a, FINAL_NORM_PREFIX.rstrip(".")).items():
        specs[name] = ParamSpec(shape, dim, stride, "head")
    if not a.tied_embeddings:
        specs[OUTPUT_LAYER_KEY] = ParamSpec(vocab, 0, 1, "head")
    if a.untied_exits:
        for number in a.exits:
            specs[exit_output_key(number)] = ParamSpec(vocab, 0, 1, "exit_output", number)
    if a.exit_vocab_size:
        specs[EXIT_VOCAB_KEY] = ParamSpec((a.exit_vocab_size,), None, 1, "exit_chunks")
    return specs


def _fmt_keys(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:6])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")


def _check_keys(what: str, got: Mapping[str, Any], expected: Mapping[str, Any], hint: str) -> None:
    missing = set(expected) - set(got)
    unexpected = set(got) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_fmt_keys(unexpected)}")
        raise StateDictError(f"{what} does not match the configuration ({'; '.join(parts)}); {hint}")


def check_full_state_dict(
    full: Mapping[str, torch.Tensor], cfg: ModelConfig, ee: EarlyExitConfig | None = None
) -> dict[str, ParamSpec]:
    """Refuse a FULL state dict with missing / unexpected keys or wrong shapes; return the spec table."""
    specs = full_state_dict_specs(cfg, ee)
    _check_keys(
        "FULL state dict",
        full,
        specs,
        "check --num-layers, --exit-layer-nums, --use-exit-norm/-mlp/-block/-linear, --exit-estimator, "
        "--exit-vocab-size, --untie-exit-output-weights, "
        "--untie-embeddings-and-output-weights, --normalization, --add-bias-linear and "
        "--position-embedding-type against the checkpoint",
    )
    for key, spec in specs.items():
        if tuple(full[key].shape) != spec.shape:
            raise StateDictError(
                f"FULL state dict key {key!r} has shape {tuple(full[key].shape)}, the configuration expects "
                f"{spec.shape}; check the size flags (--hidden-size, --num-attention-heads, --num-query-groups, "
                "--kv-channels, --ffn-hidden-size, padded vocab) against the checkpoint"
            )
    return specs


# ------------------------------------------------------------------------------------------- per-rank keys


def _chunk_layout(partition: Partition, stage: int, chunk: int) -> tuple:
    """(global layer numbers, exit layer numbers, has_embedding, has_head) of one (stage, chunk)."""
    part = partition.spec(stage, chunk)
    return part.layers, part.exits, part.has_embedding, part.has_head


def _head_copy(
    a: _Arch, exits: tuple[int, ...], has_embedding: bool, has_head: bool, ee_llm: bool = False
) -> tuple[str, str] | None:
    """The tied output-projection copy this chunk holds, as (per-rank key, FULL key), or None.

    A chunk projects logits when it carries the head or a tied exit. When the projection it needs lives
    on another chunk (the word embedding on the first, the untied output layer on the last) it keeps a
    synchronised copy: ``word_embeddings_for_head`` (EE-LLM) or ``output_layer_for_exits`` (ours).
    ``ee_llm``: EE-LLM also keeps ``word_embeddings_for_head`` on exit stages whose exits are untied
    (unused there, but its strict load expects the key)."""
    tied_exits = bool(exits) and not a.untied_exits
    if a.tied_embeddings:
        if not has_embedding and (has_head or tied_exits or (ee_llm and bool(exits))):
            return HEAD_COPY_KEY, EMBEDDING_KEY
    elif tied_exits and not has_head:
        return EXIT_HEAD_COPY_KEY, OUTPUT_LAYER_KEY
    return None


def _rank_key_map(
    a: _Arch, specs: Mapping[str, ParamSpec], partition: Partition, stage: int, chunk: int, ee_llm: bool = False
) -> dict[str, str]:
    layers, exits, has_embedding, has_head = _chunk_layout(partition, stage, chunk)
    local_layer = {number: i for i, number in enumerate(layers)}
    local_exit = {number: k for k, number in enumerate(sorted(exits))}
    out: dict[str, str] = {}
    for key, spec in specs.items():
        if spec.role == "embedding" and has_embedding or spec.role == "head" and has_head:
            out[key] = key
        elif spec.role == "layer" and spec.layer in local_layer:
            out[layer_key(local_layer[spec.layer], spec.suffix)] = key
        elif spec.role == "exit_output" and spec.layer in local_exit:
            out[exit_output_key(local_exit[spec.layer])] = key
        elif spec.role == "exit_chunks" and exits:
            out[key] = key
    copy = _head_copy(a, exits, has_embedding, has_head, ee_llm)
    if copy is not None:
        out[copy[0]] = copy[1]
    return out


def _check_partition(a: _Arch, partition: Partition) -> None:
    owned = [n for spec in partition.all_specs() for n in spec.layers]
    if sorted(owned) != list(range(1, a.num_layers + 1)):
        raise ConfigError(
            f"the partition covers layers {sorted(owned)}, not 1..{a.num_layers} (--num-layers); "
            "build it with the same --num-layers"
        )
    placed = sorted(n for spec in partition.all_specs() for n in spec.exits)
    if placed != sorted(a.exits):
        raise ConfigError(
            f"the partition places exits {placed} but --exit-layer-nums is {list(a.exits)}; "
            "build the partition with the same exit layers"
        )


def rank_key_map(
    cfg: ModelConfig, partition: Partition, stage: int, chunk: int, ee: EarlyExitConfig | None = None,
    ee_llm: bool = False,
) -> dict[str, str]:
    """Per-rank key -> FULL key for one (stage, chunk); the same for every tp rank (``ee_llm``: see
    :func:`shard_state_dict`)."""
    a = model_arch(cfg, ee)
    _check_partition(a, partition)
    return _rank_key_map(a, full_state_dict_specs(cfg, ee), partition, stage, chunk, ee_llm)


# ------------------------------------------------------------------------------------------ shard / merge


def _check_tp(a: _Arch, tp: int) -> None:
    if tp < 1:
        raise ConfigError(f"--tensor-model-parallel-size must be >= 1, got {tp}")
    checks = [
        (a.groups, "--num-query-groups (or --num-attention-heads without GQA)"),
        (a.ffn, "--ffn-hidden-size"),
        (a.padded_vocab, "the padded vocab size (--make-vocab-size-divisible-by)"),
    ]
    for value, flag in checks:
        if value % tp:
            raise ConfigError(f"{flag} = {value} is not divisible by --tensor-model-parallel-size {tp}")


def _shard_shape(spec: ParamSpec, tp: int) -> tuple[int, ...]:
    if spec.tp_dim is None:
        return spec.shape
    shape = list(spec.shape)
    shape[spec.tp_dim] //= tp
    return tuple(shape)


def shard_state_dict(
    full: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    tp: int,
    tp_rank: int,
    partition: Partition,
    stage: int,
    chunk: int,
    ee: EarlyExitConfig | None = None,
    ee_llm: bool = False,
) -> dict[str, torch.Tensor]:
    """The per-rank dict of (tp_rank, stage, chunk): what that chunk's ``model.state_dict()`` holds.

    TP-cut tensors are new contiguous tensors; replicated ones are the FULL dict's tensors themselves.
    ``ee_llm=True`` writes EE-LLM's exact key set instead: it adds the (unused) ``word_embeddings_for_head``
    on non-first stages with untied exits, which EE-LLM's strict load expects."""
    specs = check_full_state_dict(full, cfg, ee)
    a = model_arch(cfg, ee)
    _check_tp(a, tp)
    if not 0 <= tp_rank < tp:
        raise ConfigError(f"tp rank {tp_rank} outside 0..{tp - 1} (--tensor-model-parallel-size {tp})")
    _check_partition(a, partition)
    out = {}
    for local, key in _rank_key_map(a, specs, partition, stage, chunk, ee_llm).items():
        spec = specs[key]
        tensor = full[key]
        out[local] = tensor if spec.tp_dim is None else shard_tensor(tensor, spec.tp_dim, tp, tp_rank, spec.stride)
    return out


def _agree(key: str, copies: list[tuple[tuple, torch.Tensor]]) -> torch.Tensor:
    """The one value of a tensor stored in several places; they must be bit-identical."""
    if not copies:
        raise StateDictError(f"no rank holds {key!r}; the partition gives it no owner")
    (where0, first), rest = copies[0], copies[1:]
    for where, tensor in rest:
        if tensor.dtype != first.dtype or not torch.equal(tensor, first):
            raise StateDictError(
                f"copies of {key!r} disagree: (tp_rank, stage, chunk, key) {where0} differs from {where}; "
                "tied / replicated copies must be identical (was the checkpoint saved after a partial update?)"
            )
    return first


def merge_state_dicts(
    per_rank: Mapping[tuple[int, int, int], Mapping[str, torch.Tensor]],
    cfg: ModelConfig,
    tp: int,
    partition: Partition,
    ee: EarlyExitConfig | None = None,
) -> dict[str, torch.Tensor]:
    """Exact inverse of :func:`shard_state_dict` over every (tp_rank, stage, chunk) of the layout.

    Checks that every rank is there with exactly its keys and shard shapes, and that replicated tensors
    and tied copies agree bit for bit across the ranks and chunks holding them. EE-LLM's extra
    ``word_embeddings_for_head`` (see ``ee_llm`` in :func:`shard_state_dict`) is accepted and checked too."""
    a = model_arch(cfg, ee)
    _check_tp(a, tp)
    _check_partition(a, partition)
    specs = full_state_dict_specs(cfg, ee)
    expected = {(r, s, c) for r in range(tp) for s in range(partition.pp) for c in range(partition.vpp)}
    if set(per_rank) != expected:
        raise StateDictError(
            f"merge needs one dict per (tp_rank, stage, chunk) of tp={tp}, pp={partition.pp}, vpp={partition.vpp}; "
            f"missing {sorted(expected - set(per_rank))}, unexpected {sorted(set(per_rank) - expected)}"
        )
    copies: dict[str, list[list]] = {key: [[] for _ in range(tp)] for key in specs}
    for (r, s, c), sd in sorted(per_rank.items()):
        kmap = _rank_key_map(a, specs, partition, s, c, ee_llm=HEAD_COPY_KEY in sd)
        _check_keys(f"per-rank state dict (tp_rank={r}, stage={s}, chunk={c})", sd, kmap,
                    "was it saved with a different configuration or layout?")
        for local, key in kmap.items():
            want = _shard_shape(specs[key], tp)
            if tuple(sd[local].shape) != want:
                raise StateDictError(
                    f"per-rank key {local!r} of (tp_rank={r}, stage={s}, chunk={c}) has shape "
                    f"{tuple(sd[local].shape)}, expected {want} for tp={tp}"
                )
            copies[key][r].append(((r, s, c, local), sd[local]))
    full = {}
    for key, spec in specs.items():
        if spec.tp_dim is None:
            full[key] = _agree(key, [item for per_tp in copies[key] for item in per_tp])
        else:
            shards = [_agree(key, copies[key][r]) for r in range(tp)]
            full[key] = unshard_tensors(shards, spec.tp_dim, spec.stride)
    return full
