"""Transformer building blocks: norms, rotary embedding, attention with KV cache, MLP, layer, init."""

from .attention import SelfAttention, core_attention
from .initialization import InitScope, SeededInit, SkipInit, derive_seed
from .kv_cache import InferenceParams
from .layer import TransformerLayer
from .mlp import MLP, ExitMLP
from .norms import RMSNorm, build_norm
from .rotary import RotaryEmbedding, apply_rotary

__all__ = [
    "SelfAttention",
    "core_attention",
    "InitScope",
    "SeededInit",
    "SkipInit",
    "derive_seed",
    "InferenceParams",
    "TransformerLayer",
    "MLP",
    "ExitMLP",
    "RMSNorm",
    "build_norm",
    "RotaryEmbedding",
    "apply_rotary",
]
