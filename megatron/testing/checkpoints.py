"""Small Megatron checkpoints for the checkpoint-tool tests (``tools/checkpoint``).

:func:`tool_config` is the tiny model the exit tools are tested on (``"llama"``: RMSNorm, SwiGLU, RoPE,
GQA 4 heads in 2 groups, untied head; ``"gpt"``: the plain GPT), vocabulary 60 padded to 64, sequences of 8;
:func:`write_checkpoint` saves seeded random weights of it (with exits ``ee``) as a tp 2 x pp 2 Megatron
checkpoint and returns the full state dict; :func:`run_converter` runs ``checkpoint_converter`` on one and
reads the result back.

The writers and the converter are the repository's ``tools/`` (not part of the package): they are
imported when called, so the checkout's root must be on ``sys.path`` (it is under pytest).
"""

from __future__ import annotations

import torch

from megatron.config import EarlyExitConfig, ModelConfig
from megatron.model.state_dict_sharding import full_state_dict_specs
from megatron.testing.models import tiny_config

__all__ = ["tool_config", "write_checkpoint", "run_converter"]


def tool_config(kind: str) -> ModelConfig:
    """The exit tools' tiny model, ``kind`` ``"llama"`` or ``"gpt"``."""
    if kind == "llama":
        return tiny_config("llama", ffn_hidden_size=32, seq_length=8, vocab_size=60, padded_vocab_size=64)
    return tiny_config("gpt", ffn_hidden_size=64, seq_length=8, vocab_size=60, padded_vocab_size=64)


def write_checkpoint(directory, kind: str = "llama", ee: EarlyExitConfig | None = None, seed: int = 0) -> dict:
    """Seeded random weights (std 0.3) of ``tool_config(kind)`` with exits ``ee``, saved at tp 2 x pp 2 in
    ``directory``; the full state dict."""
    from tools.checkpoint.cli import save_megatron
    from tools.checkpoint.megatron_io import Layout, ModelCheckpoint

    cfg, ee = tool_config(kind), ee or EarlyExitConfig()
    g = torch.Generator().manual_seed(seed)
    full = {k: torch.randn(s.shape, generator=g) * 0.3 for k, s in full_state_dict_specs(cfg, ee).items()}
    save_megatron(str(directory), ModelCheckpoint(full, cfg, ee), Layout(2, 2))
    return full


def run_converter(src, dst, *flags):
    """``checkpoint_converter`` from ``src`` (iteration 1) to ``dst`` with ``flags``; what it wrote, read back."""
    from tools.checkpoint import checkpoint_converter
    from tools.checkpoint.megatron_io import read_megatron

    checkpoint_converter.main(["--load-dir", str(src), "--save-dir", str(dst), "--load-iteration", "1", *flags])
    return read_megatron(str(dst))
