"""Tiny model configurations for tests: one builder instead of a hand-written ``ModelConfig`` per file.

``tiny_config(arch, **overrides)`` is a 4-layer, 32-wide, 4-head model with dropout off, in the GPT
(LayerNorm, learned positions, biases, tied head) or the Llama shape (:data:`ARCHS`: RMSNorm, SwiGLU,
RoPE, GQA with 2 groups, no biases, untied head); any ``ModelConfig`` field can be overridden. Everything
not named keeps ``ModelConfig``'s default (e.g. ``vocab_size=128``, ``seed=1234``).

``split_config`` / ``split_model`` / ``random_batch`` are the single-process model tests' pieces: the
config whose pipeline splits are compared with the unsplit model, all stages (and chunks) of a partition
built in one process, and a seeded batch of token ids with its next-token labels.
"""

from __future__ import annotations

import torch

from megatron.config import EarlyExitConfig, ModelConfig

__all__ = ["ARCHS", "GPT", "LLAMA", "TINY", "tiny_config", "split_config", "split_model", "random_batch"]

GPT = dict(normalization="LayerNorm", swiglu=False, position_embedding_type="learned_absolute")
"""The GPT shape's fields (all of them ``ModelConfig``'s defaults, spelled out)."""
LLAMA = dict(normalization="RMSNorm", swiglu=True, position_embedding_type="rope", num_query_groups=2,
             add_bias_linear=False, untie_embeddings_and_output_weights=True, ffn_hidden_size=48)
"""The Llama shape's fields (GQA: 4 heads in 2 groups; SwiGLU width 48)."""
ARCHS = {"gpt": GPT, "llama": LLAMA}

TINY = dict(num_layers=4, hidden_size=32, num_attention_heads=4, hidden_dropout=0.0, attention_dropout=0.0)
"""The fields every tiny config shares unless overridden."""


def tiny_config(arch: str | None = "gpt", **overrides) -> ModelConfig:
    """:data:`TINY`, then ``ARCHS[arch]`` (``None``: no architecture fields), then ``overrides``."""
    return ModelConfig(**{**TINY, **(ARCHS[arch] if arch else {}), **overrides})


def split_config(num_layers: int = 4, **overrides) -> ModelConfig:
    """The model-splitting tests' config: vocabulary 100 (padded to 128), sequences of 8 (16 positions),
    seed 7; pass ``**GPT`` or ``**LLAMA`` (or any field) as overrides."""
    fields = dict(num_layers=num_layers, vocab_size=100, make_vocab_size_divisible_by=32, seq_length=8,
                  max_position_embeddings=16, seed=7)
    return tiny_config(None, **{**fields, **overrides})


def split_model(config: ModelConfig, ee: EarlyExitConfig, pp: int, vpp: int = 1, layers_per_stage=None):
    """Every (stage, chunk) of a ``pp`` x ``vpp`` partition, built in this process, in partition order."""
    from megatron.core.parallel_state import ParallelState
    from megatron.model import EarlyExitGPTModel, partition

    part = partition(config.num_layers, pp, vpp, ee.exit_layer_nums, layers_per_stage)
    state = ParallelState.single()
    return [EarlyExitGPTModel(config, ee, state=state, partition=part, stage=s.stage, chunk=s.chunk)
            for s in part.all_specs()]


def random_batch(b: int = 2, s: int = 8, vocab: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, labels)``, each ``[b, s]``: seeded random ids and the same ids shifted by one."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]
