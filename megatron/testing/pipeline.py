"""The pipeline parity tests' model and data: an 8-layer tiny model (:data:`LAYERS`, vocabulary
:data:`VOCAB` = 60, sequences of :data:`SEQ` = 8, micro-batches of :data:`MBS` = 2), GPT or Llama shape,
with three exit layouts (:data:`EXITS`: tied norm exits, untied MLP exits, pre-exit blocks).

:func:`model_config` is that model (``sp``: sequence parallel); :func:`configs` adds an exit layout;
:func:`microbatch` is data-parallel rank ``dp_rank``'s seeded micro-batch ``mb`` (tokens, labels and a
random loss mask), the same on every layout, so a parallel run and its one-process reference see the
same data.
"""

from __future__ import annotations

import torch

from megatron.config import EarlyExitConfig, ModelConfig
from megatron.testing.models import tiny_config

__all__ = ["SEQ", "MBS", "VOCAB", "LAYERS", "EXITS", "model_config", "configs", "microbatch"]

SEQ, MBS, VOCAB, LAYERS = 8, 2, 60, 8
EXITS = dict(
    tied=dict(exit_layer_nums=[2, 5, 8], exit_layer_weight=[0.3, 0.6, 0.9], use_exit_norm=True),
    untied=dict(exit_layer_nums=[3, 6, 8], exit_layer_weight=[0.5, 0.25, 1.0], untie_exit_output_weights=True,
                use_exit_mlp=True),
    pre=dict(exit_layer_nums=[3, 5, 7], exit_layer_weight=[0.4, 0.4, 0.2], pre_exit=True, use_exit_block=True),
)


def model_config(arch: str, sp: bool = False) -> ModelConfig:
    """The 8-layer model in the ``arch`` shape (``"gpt"`` or ``"llama"``), seed 11."""
    return tiny_config(arch, num_layers=LAYERS, vocab_size=VOCAB, make_vocab_size_divisible_by=16, seq_length=SEQ,
                       sequence_parallel=sp, seed=11)


def configs(arch: str, exits: str, sp: bool = False) -> tuple[ModelConfig, EarlyExitConfig]:
    """:func:`model_config` with the exit layout ``EXITS[exits]``."""
    return model_config(arch, sp), EarlyExitConfig(**EXITS[exits])


def microbatch(dp_rank: int, mb: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * dp_rank + mb)
    text = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g)
    mask = (torch.rand(MBS, SEQ, generator=g) > 0.2).float()
    return {"tokens": text[:, :-1], "labels": text[:, 1:], "loss_mask": mask}
