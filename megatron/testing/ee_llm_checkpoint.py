"""Rewrite one of our checkpoints in the layout EE-LLM writes, to test that EE-LLM's checkpoints load.

EE-LLM (and legacy Megatron-LM) save ``model.state_dict_for_save_checkpoint()``: each module with its own
save method nests its entry one level, the rest is a plain ``state_dict()`` with dotted keys. The nesting
below is spelled out per module from EE-LLM's ``EarlyExitGPTModel`` / ``EarlyExitTransformerLanguageModel``
/ ``Embedding`` save methods (not derived from our reader, which it exists to test):

- ``EarlyExitGPTModel``: ``{"language_model": ..., "word_embeddings_for_head": {"weight"}}``; the tied copy
  sits on every non-first stage that projects logits with the word embedding, *and* on non-first stages
  whose exits are untied (EE-LLM's ``is_output_embedding_pipeline_stage``), where nothing reads it;
- ``language_model``: ``{"embedding": {"word_embeddings": {"weight"}, "position_embeddings": {"weight"}},
  "exit_output_layer": {"0.weight", ...}, "encoder": {"layers.0.input_norm.weight", ...,
  "final_norm.weight"}, "output_layer": {"weight"}}``.
"""

from __future__ import annotations

import os

import torch

from megatron.checkpoint import checkpoint_file, read_file
from megatron.checkpoint.layout import iteration_dir
from megatron.checkpoint.manifest import MANIFEST_FILE
from megatron.config import EarlyExitConfig, ModelConfig
from megatron.model.partition import partition
from megatron.model.state_dict_sharding import EMBEDDING_KEY, HEAD_COPY_KEY, rank_key_map

__all__ = ["nest_like_ee_llm", "rewrite_as_ee_llm"]

# (our key prefix, EE-LLM's nesting path): a module that saves with its own method -> one dict level.
_NESTING = (
    ("language_model.embedding.word_embeddings.", ("language_model", "embedding", "word_embeddings")),
    ("language_model.embedding.position_embeddings.", ("language_model", "embedding", "position_embeddings")),
    ("language_model.exit_output_layer.", ("language_model", "exit_output_layer")),
    ("language_model.encoder.", ("language_model", "encoder")),
    ("language_model.output_layer.", ("language_model", "output_layer")),
    ("word_embeddings_for_head.", ("word_embeddings_for_head",)),
)


def nest_like_ee_llm(flat: dict[str, torch.Tensor]) -> dict:
    """One chunk's flat per-rank dict nested as EE-LLM's ``state_dict_for_save_checkpoint`` returns it."""
    nested: dict = {}
    for key, tensor in flat.items():
        prefix, where = next(((p, w) for p, w in _NESTING if key.startswith(p)), (None, None))
        if prefix is None:
            raise ValueError(f"{key!r} has no place in EE-LLM's layout (a tensor EE-LLM's model does not have)")
        node = nested
        for name in where:
            node = node.setdefault(name, {})
        node[key[len(prefix):]] = tensor
    return nested


def rewrite_as_ee_llm(root: str, iteration: int, cfg: ModelConfig, ee: EarlyExitConfig, tp: int, pp: int) -> None:
    """Rewrite every rank file of ``iteration`` under ``root`` (tp x pp, one chunk per stage) with EE-LLM's
    exact key set (adding its unused embedding copies) and nesting; the other entries stay as they are.
    The manifest goes (EE-LLM writes none)."""
    part = partition(cfg.num_layers, pp, 1, ee.exit_layer_nums)
    for tp_rank in range(tp):
        embedding = read_file(checkpoint_file(root, iteration, tp_rank, 0, pp))["model"][EMBEDDING_KEY]
        for stage in range(pp):
            path = checkpoint_file(root, iteration, tp_rank, stage, pp)
            ckpt = read_file(path)
            flat = dict(ckpt["model"])
            wanted = set(rank_key_map(cfg, part, stage, 0, ee, ee_llm=True))
            if HEAD_COPY_KEY in wanted and HEAD_COPY_KEY not in flat:
                flat[HEAD_COPY_KEY] = embedding.clone()
            if set(flat) != wanted:
                raise ValueError(f"{path}: keys {sorted(set(flat) ^ wanted)} differ from EE-LLM's key set")
            ckpt["model"] = nest_like_ee_llm(flat)
            tmp = path + ".rewrite"
            torch.save(ckpt, tmp)
            os.replace(tmp, path)
    manifest = os.path.join(iteration_dir(root, iteration), MANIFEST_FILE)
    if os.path.exists(manifest):
        os.remove(manifest)
