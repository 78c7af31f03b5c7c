"""Early-exit edits of a whole model (the FULL state dict): add exits, move exits between pre and post.

Working on the FULL dict (and resharding to the checkpoint's own layout afterwards) makes every new tensor
one tensor: random initialisation is drawn once per key from a generator seeded by ``(seed, key)``, so it
is reproducible, independent of the order of work, and every tp shard / tied copy agrees.

add-exit (EE-LLM's ``tools/checkpoint/checkpoint_converter.py --conversion-type add-exit``, with its bugs
fixed): the exit layers become the union of the existing and the requested ones; the exit parts (norm /
MLP branch / block / untied projection) become the union of the existing and the requested ones and every
exit missing a part gets it, old exits included.
Copy initialisation: ``exit_norm`` <- the final norm, the branch MLP <- the layer's own (trunk) MLP,
``exit_block`` <- the last backbone layer (its trunk MLP when that layer is an exit-MLP layer), an untied
projection <- the output projection (``output_layer``, or the word embedding when tied). Random: norms 1,
biases 0, ``dense`` / ``dense_4h_to_h`` ~ N(0, std / sqrt(2 num_layers)) (Megatron's scaled init), other
weights and projections ~ N(0, std). Works on plain (no-exit) checkpoints; linear biases are created too.
Parts with nothing to copy get what a freshly built model has, in both modes: ``exit_linear`` zeros (the
identity map), ``exit_estimator`` the model's own seeded draw (``SeededInit`` of the checkpoint's seed and
std), an ``exit_vocab`` not yet present ``-1`` (unfilled).
Per-exit lists (``exit_layer_weight``, ``..._init``, ``exit_layer_temperature``) keep the existing exits'
values; new exits get 1.0 / 0.0 / 1.0 (lists left empty stay empty: every exit takes the default).

exit-position: a post exit at layer L reads the same hidden state as a pre exit at layer L + 1, so
post -> pre adds 1 to every exit number and pre -> post subtracts 1, and EVERY exit tensor moves with its
exit (norm, block, projection; EE-LLM moved only the projection). Exit MLPs exist only as post exits.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from dataclasses import dataclass

import torch

from megatron.config import ConfigError, EarlyExitConfig
from megatron.core.transformer import SeededInit
from megatron.model.state_dict_sharding import (
    EMBEDDING_KEY,
    EXIT_VOCAB_KEY,
    FINAL_NORM_PREFIX,
    OUTPUT_LAYER_KEY,
    ParamSpec,
    StateDictError,
    check_full_state_dict,
    exit_output_key,
    full_state_dict_specs,
    layer_key,
)

from .megatron_io import ModelCheckpoint

__all__ = ["AddExitRequest", "add_exits", "move_exits"]

# Per-exit lists of EarlyExitConfig and the value a new exit gets.
_PER_EXIT_DEFAULTS = {"exit_layer_weight": 1.0, "exit_layer_weight_init": 0.0, "exit_layer_temperature": 1.0}
_LAYER_RE = re.compile(r"^language_model\.encoder\.layers\.(\d+)\.(exit_norm\.|exit_block\.|exit_linear\.|"
                       r"exit_estimator\.)(.*)$")
_EXIT_OUT_RE = re.compile(r"^language_model\.exit_output_layer\.(\d+)\.weight$")


@dataclass(frozen=True)
class AddExitRequest:
    """The converter's add-exit flags. ``untie``: None keeps the checkpoint's choice (untied for a model
    without exits, as EE-LLM). ``position``: 'pre' / 'post' / None (the checkpoint's, else post)."""

    layers: tuple[int, ...]
    use_exit_norm: bool = False
    use_exit_mlp: bool = False
    use_exit_block: bool = False
    untie: bool | None = None
    random_init: bool = False
    init_method_std: float = 0.02
    seed: int = 1234
    position: str | None = None


def _per_exit_lists(old: EarlyExitConfig, layers: list[int], mapping: dict[int, int]) -> dict:
    """Per-exit lists for the exits ``layers``; ``mapping`` new layer -> old layer for kept exits."""
    out = {}
    for name, default in _PER_EXIT_DEFAULTS.items():
        values = list(getattr(old, name))
        if values:
            by_old = dict(zip(old.exit_layer_nums, values))
            out[name] = [by_old.get(mapping.get(layer), default) for layer in layers]
    return out


def _new_exit_config(old: EarlyExitConfig, req: AddExitRequest, num_layers: int) -> EarlyExitConfig:
    bad = [n for n in req.layers if not 1 <= n <= num_layers]
    if not req.layers or bad:
        raise ConfigError(f"--add-exit-layer-nums must name layers in 1..{num_layers} (--num-layers of the "
                          f"checkpoint), got {list(req.layers)}")
    had_exits = bool(old.exit_layer_nums)
    pre = old.pre_exit if had_exits else req.position == "pre"
    if had_exits and req.position is not None and (req.position == "pre") != old.pre_exit:
        raise ConfigError(f"the checkpoint's exits are {'pre' if old.pre_exit else 'post'} exits and "
                          f"--target-exit-position is {req.position}; move them first with --conversion-type "
                          "exit-position, then add exits")
    untie = req.untie if req.untie is not None else (old.untie_exit_output_weights if had_exits else True)
    if had_exits and old.untie_exit_output_weights and not untie:
        raise ConfigError("--tie-exit-output-weights would drop the checkpoint's own exit projections; "
                          "keep them untied (--untie-exit-output-weights)")
    target = sorted(set(old.exit_layer_nums) | set(req.layers))
    ee = dataclasses.replace(
        old, exit_layer_nums=target, pre_exit=pre, untie_exit_output_weights=untie,
        use_exit_norm=old.use_exit_norm or req.use_exit_norm, use_exit_mlp=old.use_exit_mlp or req.use_exit_mlp,
        use_exit_block=old.use_exit_block or req.use_exit_block,
        **_per_exit_lists(old, target, {n: n for n in old.exit_layer_nums}))
    return ee.validate(num_layers)


def _generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 63))


def _random_tensor(key: str, spec: ParamSpec, req: AddExitRequest, num_layers: int, dtype) -> torch.Tensor:
    if key.endswith("norm.weight"):
        return torch.ones(spec.shape, dtype=dtype)
    if key.endswith(".bias"):
        return torch.zeros(spec.shape, dtype=dtype)
    std = req.init_method_std
    if key.endswith(("self_attention.dense.weight", "dense_4h_to_h.weight")):
        std = std / math.sqrt(2.0 * num_layers)
    values = torch.randn(spec.shape, generator=_generator(req.seed, key), dtype=torch.float32) * std
    return values.to(dtype)


def _fresh_tensor(key: str, spec: ParamSpec, cfg, dtype) -> torch.Tensor | None:
    """A new tensor of a part with nothing to copy (see the module docstring), else None."""
    if key == EXIT_VOCAB_KEY:
        return torch.full(spec.shape, -1, dtype=torch.long)
    if spec.suffix.startswith("exit_linear."):
        return torch.zeros(spec.shape, dtype=dtype)
    if spec.suffix.startswith("exit_estimator."):
        if spec.suffix.endswith(".bias"):
            return torch.zeros(spec.shape, dtype=dtype)
        recipe = SeededInit(cfg.seed, cfg.init_method_std, cfg.num_layers)
        return recipe.normal(spec.layer, spec.suffix)(torch.empty(spec.shape, dtype=dtype))
    return None


def _copy_source(key: str, spec: ParamSpec, full: dict, num_layers: int, tied_embeddings: bool) -> str:
    """The FULL key a new exit tensor is copied from."""
    if spec.role == "exit_output":
        return EMBEDDING_KEY if tied_embeddings else OUTPUT_LAYER_KEY
    part = spec.suffix
    if part.startswith("mlp.branch."):
        return layer_key(spec.layer - 1, "mlp.trunk." + part[len("mlp.branch."):])
    if part.startswith("exit_norm."):
        return FINAL_NORM_PREFIX + part[len("exit_norm."):]
    if part.startswith("exit_block."):
        rest = part[len("exit_block."):]
        source = layer_key(num_layers - 1, rest)
        if source not in full and rest.startswith("mlp."):
            source = layer_key(num_layers - 1, "mlp.trunk." + rest[len("mlp."):])
        return source
    raise StateDictError(f"{key!r} is missing from the checkpoint and is not an exit tensor the converter creates")


def add_exits(ckpt: ModelCheckpoint, req: AddExitRequest) -> ModelCheckpoint:
    """``ckpt`` with the requested exits added (see the module docstring); the layout is unchanged."""
    cfg = ckpt.model
    ee = _new_exit_config(ckpt.ee, req, cfg.num_layers)
    specs = full_state_dict_specs(cfg, ee)
    full = dict(ckpt.full)
    for layer in ee.exit_layer_nums if ee.use_exit_mlp else ():
        for key in [k for k in full if k.startswith(layer_key(layer - 1, "mlp.dense_"))]:
            full[key.replace(".mlp.", ".mlp.trunk.", 1)] = full.pop(key)  # the backbone MLP becomes the trunk
    leftover = sorted(set(full) - set(specs))
    if leftover:
        raise StateDictError(f"checkpoint tensors {leftover[:4]} have no place in the converted model")
    dtype = full[EMBEDDING_KEY].dtype
    tied = not cfg.untie_embeddings_and_output_weights
    for key, spec in specs.items():
        if key in full:
            continue
        fresh = _fresh_tensor(key, spec, cfg, dtype)
        if fresh is not None:
            full[key] = fresh
        elif req.random_init and not (spec.role == "exit_output" and spec.layer in ckpt.ee.exit_layer_nums):
            full[key] = _random_tensor(key, spec, req, cfg.num_layers, dtype)
        else:  # an existing tied exit that becomes untied keeps its function: copy the shared projection
            full[key] = full[_copy_source(key, spec, full, cfg.num_layers, tied)].clone()
    check_full_state_dict(full, cfg, ee)
    return dataclasses.replace(ckpt, full={key: full[key] for key in specs}, ee=ee)


def move_exits(ckpt: ModelCheckpoint, target_position: str) -> ModelCheckpoint:
    """Every exit moved to ``target_position`` ('pre' / 'post') with all its tensors; the layout is unchanged."""
    old, cfg = ckpt.ee, ckpt.model
    if target_position not in ("pre", "post"):
        raise ConfigError(f"--target-exit-position must be pre or post, got {target_position!r}")
    if not old.exit_layer_nums:
        raise ConfigError("the checkpoint has no exits to move; add some with --conversion-type add-exit")
    to_pre = target_position == "pre"
    if old.pre_exit == to_pre:
        raise ConfigError(f"the checkpoint's exits are already {target_position} exits")
    if old.use_exit_mlp:
        raise ConfigError("exit-MLP exits (--use-exit-mlp) exist only as post exits; they cannot become pre exits")
    shift = 1 if to_pre else -1
    moved = {n: n + shift for n in old.exit_layer_nums}
    bad = [n for n, m in moved.items() if not 1 <= m <= cfg.num_layers]
    if bad:
        what = "after the last layer" if to_pre else "before layer 1 (it reads the embedding)"
        raise ConfigError(f"exits at layers {bad} would move {what}: a {'post' if to_pre else 'pre'} exit there has "
                          f"no {target_position} equivalent; remove it first")
    layers = [moved[n] for n in old.exit_layer_nums]
    ee = dataclasses.replace(old, exit_layer_nums=layers, pre_exit=to_pre,
                             **_per_exit_lists(old, layers, {m: n for n, m in moved.items()})).validate(cfg.num_layers)
    full = {}
    for key, tensor in ckpt.full.items():
        m = _LAYER_RE.match(key)
        if m:
            key = layer_key(moved[int(m.group(1)) + 1] - 1, m.group(2) + m.group(3))
        elif (m := _EXIT_OUT_RE.match(key)) is not None:
            key = exit_output_key(moved[int(m.group(1))])
        full[key] = tensor
    specs = check_full_state_dict(full, cfg, ee)
    return dataclasses.replace(ckpt, full={key: full[key] for key in specs}, ee=ee)
