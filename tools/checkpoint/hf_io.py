"""Local Hugging Face model directories <-> :class:`ModelCheckpoint` (Llama 2 / 3 incl. GQA, GPT-2).

Reading: ``config.json`` plus the weights as ``model.safetensors``, a sharded
``model.safetensors.index.json``, ``pytorch_model.bin`` or a sharded ``pytorch_model.bin.index.json``.
Nothing is downloaded.

Writing: ``config.json`` + ``model.safetensors`` that ``transformers`` loads with ``from_pretrained``
(a tied ``lm_head`` is left out: transformers ties it on load). An early-exit model keeps everything HF has
no place for in two files beside them:

- ``early_exit_heads.safetensors``: every exit tensor under its FULL key name (``exit_norm``, the exit-MLP
  ``mlp.branch`` of layer ``L`` at ``language_model.encoder.layers.<L-1>.``, ``exit_block``, ``exit_linear``,
  ``exit_estimator``, untied ``language_model.exit_output_layer.<L>.weight`` with all ``padded_vocab_size``
  rows, and the int64 ``exit_vocab`` buffer);
- ``early_exit_heads.json``: ``{"format": "ee-megatron-exit-heads", "version": 1, "early_exit": {the
  EarlyExitConfig fields}, "padded_vocab_size": N, "tensors": [keys]}``.

For exit-MLP layers the HF MLP is the backbone (trunk) MLP. The ``llama_hf`` / ``gpt2_hf`` loaders read the
two files back when present, so HF -> ours -> HF -> ours is lossless.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import torch

from megatron.checkpoint.layout import CheckpointError
from megatron.config import EarlyExitConfig
from megatron.model.hf_convert import config_from_hf, full_from_hf, hf_config_from, hf_from_full

from .megatron_io import ModelCheckpoint

__all__ = ["EXIT_HEADS_FILE", "EXIT_HEADS_JSON", "read_hf_state_dict", "load_hf", "save_hf", "tokenizer_args",
           "explicit_tokenizer_args"]

EXIT_HEADS_FILE = "early_exit_heads.safetensors"
EXIT_HEADS_JSON = "early_exit_heads.json"
_FORMAT = "ee-megatron-exit-heads"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt")


def _read_weights_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def read_hf_state_dict(directory: str) -> dict[str, torch.Tensor]:
    """The model's tensors from the first weight format found (safetensors first, sharded or not)."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if os.path.isfile(os.path.join(directory, single)):
            return _read_weights_file(os.path.join(directory, single))
        index_path = os.path.join(directory, index)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(_read_weights_file(os.path.join(directory, shard)))
            return state
    raise CheckpointError(f"--load-dir {directory} holds no model.safetensors, model.safetensors.index.json, "
                          "pytorch_model.bin or pytorch_model.bin.index.json")


def explicit_tokenizer_args(tokenizer_model: str) -> dict:
    """Megatron tokenizer args for ``--tokenizer-model``: a ``.model`` file is SentencePiece (Llama2Tokenizer),
    anything else a tokenizer.json / HF directory (HuggingFaceTokenizer)."""
    kind = "Llama2Tokenizer" if tokenizer_model.endswith(".model") else "HuggingFaceTokenizer"
    return {"tokenizer_type": kind, "tokenizer_model": os.path.abspath(tokenizer_model)}


def tokenizer_args(directory: str, family: str, tokenizer_model: str | None = None) -> dict:
    """Megatron tokenizer args for an HF directory: ``--tokenizer-model`` when given, else the directory's
    ``tokenizer.json`` (HuggingFaceTokenizer), its Llama ``tokenizer.model`` (Llama2Tokenizer), or GPT-2's
    ``vocab.json`` + ``merges.txt``; empty when there is none."""
    if tokenizer_model:
        return explicit_tokenizer_args(tokenizer_model)
    has = {name: os.path.isfile(os.path.join(directory, name)) for name in _TOKENIZER_FILES}
    if has["tokenizer.json"] or (has["vocab.json"] and has["merges.txt"]):
        return {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": os.path.abspath(directory)}
    if has["tokenizer.model"] and family == "llama":
        return {"tokenizer_type": "Llama2Tokenizer",
                "tokenizer_model": os.path.abspath(os.path.join(directory, "tokenizer.model"))}
    return {}


def _read_exit_heads(directory: str) -> tuple[EarlyExitConfig | None, dict, int | None]:
    meta_path = os.path.join(directory, EXIT_HEADS_JSON)
    if not os.path.isfile(meta_path):
        return None, {}, None
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != _FORMAT or meta.get("version") != 1:
        raise CheckpointError(f"{meta_path} is not an {_FORMAT} version 1 file")
    from safetensors.torch import load_file

    exits = load_file(os.path.join(directory, EXIT_HEADS_FILE))
    return EarlyExitConfig(**meta["early_exit"]), exits, meta["padded_vocab_size"]


def load_hf(directory: str, family: str, *, tp: int = 1, make_vocab_size_divisible_by: int = 1,
            tokenizer_model: str | None = None) -> ModelCheckpoint:
    """An HF ``family`` ('llama' or 'gpt2') directory as a ModelCheckpoint (iteration 1, as EE-LLM's
    converter writes). The vocab is padded for ``tp`` (``make_vocab_size_divisible_by`` 1: only as far as
    tp needs, like EE-LLM's Llama loader); exit heads saved by :func:`save_hf` are restored."""
    import transformers

    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise CheckpointError(f"--load-dir {directory} has no config.json; give a local Hugging Face model directory")
    hf_config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    if hf_config.model_type != family:
        fix = "gpt2_hf" if hf_config.model_type == "gpt2" else "llama_hf"
        raise CheckpointError(f"{directory}/config.json has model_type {hf_config.model_type!r}; the loader expects "
                              f"{family!r} (use --loader {fix})")
    cfg = config_from_hf(hf_config, make_vocab_size_divisible_by=make_vocab_size_divisible_by, tp=tp)
    ee, exits, padded = _read_exit_heads(directory)
    if padded is not None:
        cfg.padded_vocab_size = padded
    full = full_from_hf(read_hf_state_dict(directory), cfg, ee, exits)
    return ModelCheckpoint(full, cfg, ee or EarlyExitConfig(), tokenizer=tokenizer_args(directory, family,
                                                                                          tokenizer_model))


def _copy_tokenizer(ckpt: ModelCheckpoint, directory: str) -> None:
    for name, text in ckpt.tokenizer_files.items():
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            f.write(text)
    source = ckpt.tokenizer.get("tokenizer_model")
    if source is None or ckpt.tokenizer_files:
        return
    files = [os.path.join(source, n) for n in _TOKENIZER_FILES] if os.path.isdir(source) else [source]
    for path in files:
        if os.path.isfile(path):
            shutil.copy(path, os.path.join(directory, os.path.basename(path)))


def save_hf(directory: str, ckpt: ModelCheckpoint) -> None:
    """Write ``ckpt`` as a transformers directory (plus the exit-head files of an early-exit model and the
    tokenizer files the source named)."""
    from safetensors.torch import save_file

    if os.path.isfile(os.path.join(directory, "config.json")):
        raise CheckpointError(f"--save-dir {directory} already holds a model (config.json); choose a new directory")
    os.makedirs(directory, exist_ok=True)
    export = hf_from_full(ckpt.full, ckpt.model, ckpt.ee)
    state = dict(export.state_dict)
    if not ckpt.model.untie_embeddings_and_output_weights:
        state.pop("lm_head.weight")  # the same tensor as the embedding; safetensors refuses shared storage
    hf_config = hf_config_from(ckpt.model)
    hf_config.dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")  # what from_pretrained casts to
    hf_config.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(directory, "model.safetensors"),
              metadata={"format": "pt"})
    if ckpt.ee.exit_layer_nums:  # also with no exit tensors (tied plain exits): the json keeps the exit layers
        save_file({k: v.contiguous() for k, v in export.exits.items()}, os.path.join(directory, EXIT_HEADS_FILE),
                  metadata={"format": "pt"})
        meta = {"format": _FORMAT, "version": 1, "early_exit": dataclasses.asdict(ckpt.ee),
                "padded_vocab_size": ckpt.model.padded_vocab_size, "tensors": sorted(export.exits)}
        with open(os.path.join(directory, EXIT_HEADS_JSON), "w") as f:
            json.dump(meta, f, indent=2)
    _copy_tokenizer(ckpt, directory)
