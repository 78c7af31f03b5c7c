"""The model entries of a checkpoint file as flat per-rank state dicts, whichever program wrote them.

Ours: ``model`` (``model0``, ``model1``, ... with a virtual pipeline) is the chunk's ``state_dict()``, with
dotted keys. EE-LLM and legacy Megatron-LM save ``state_dict_for_save_checkpoint`` instead, nested one
level per sub-module that has its own save method::

    {"language_model": {"embedding": {"word_embeddings": {"weight": T}, "position_embeddings": {...}},
                        "exit_output_layer": {"0.weight": T, ...},        # untied exits
                        "encoder": {"layers.0.input_norm.weight": T, ..., "final_norm.weight": T},
                        "output_layer": {"weight": T}},                   # untied embeddings
     "word_embeddings_for_head": {"weight": T}}                           # tied copy off the first stage

Joining the nesting with dots gives exactly our names (EE-LLM's key table in ``megatron/model/
state_dict_sharding.py``), so one reader serves training's ``--load``, the server, evaluation and the
converter. EE-LLM also keeps ``word_embeddings_for_head`` on non-first stages whose exits are untied, where
nothing reads it; a model that has no such tensor drops it (:func:`fit_to_model`).
"""

from __future__ import annotations

import logging
import re
from typing import Mapping

import torch

from megatron.model.state_dict_sharding import HEAD_COPY_KEY

from .layout import CheckpointError
from .save import model_keys

__all__ = ["flatten_model_dict", "model_dicts", "fit_to_model"]

log = logging.getLogger(__name__)

_MODEL_ENTRY = re.compile(r"model\d*")


def flatten_model_dict(tree: Mapping, path: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """A nested ``state_dict_for_save_checkpoint`` as dotted keys (a flat dict passes through unchanged)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten_model_dict(value, path, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            out[f"{prefix}{key}"] = value
        elif value is not None:
            raise CheckpointError(f"{path}: model entry {prefix}{key} is a {type(value).__name__}, not a tensor")
    return out


def model_dicts(ckpt: Mapping, path: str, num_chunks: int, hint: str) -> list[dict[str, torch.Tensor]]:
    """The flat state dict of each of ``num_chunks`` chunks in the checkpoint file ``ckpt`` (read from
    ``path``); ``hint`` says how to fix a file holding other chunks."""
    keys = model_keys(num_chunks)
    saved = sorted(k for k in ckpt if _MODEL_ENTRY.fullmatch(k))
    if saved != sorted(keys):
        raise CheckpointError(f"{path} holds model chunks {saved}, expected {keys}: {hint}")
    out = []
    for key in keys:
        entry = ckpt[key]
        if not isinstance(entry, Mapping):
            raise CheckpointError(f"{path} [{key}] is a {type(entry).__name__}, not a state dict")
        flat = flatten_model_dict(entry, path)
        if len(flat) != len(entry):
            log.info("%s [%s]: nested (EE-LLM / Megatron-LM) model layout, read as %d tensors", path, key, len(flat))
        out.append(flat)
    return out


def fit_to_model(sd: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """``sd`` without EE-LLM's unused ``word_embeddings_for_head`` when the model (whose state-dict keys
    are ``expected``) has no such tensor."""
    if HEAD_COPY_KEY in sd and HEAD_COPY_KEY not in expected:
        return {k: v for k, v in sd.items() if k != HEAD_COPY_KEY}
    return sd
