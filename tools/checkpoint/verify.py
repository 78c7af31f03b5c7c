"""Run a FULL state dict as a model in one process (tp = pp = 1) to compare the logits of conversions.

The stage modules are built at tp = 1 straight from the FULL dict, so the result does not depend on how
a checkpoint was cut: equal logits before and after a reshard / conversion mean the function is unchanged.
"""

from __future__ import annotations

import torch

from megatron.config import EarlyExitConfig, ModelConfig
from megatron.core.parallel_state import ParallelState
from megatron.model.early_exit_gpt_model import EarlyExitGPTModel
from megatron.model.partition import partition
from megatron.model.state_dict_sharding import shard_state_dict

__all__ = ["full_logits"]


def full_logits(full: dict[str, torch.Tensor], cfg: ModelConfig, ee: EarlyExitConfig, input_ids: torch.Tensor,
                pp: int = 1) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """(final logits ``[b, s, V_padded]``, {exit layer: exit logits}) of ``input_ids`` ``[b, s]`` in eval mode;
    ``pp`` > 1 runs the model as that many stage modules one after the other (same numbers)."""
    part = partition(cfg.num_layers, pp, 1, ee.exit_layer_nums)
    state = ParallelState.single()
    hidden, exit_logits = None, {}
    with torch.no_grad():
        for spec in part.all_specs():
            model = EarlyExitGPTModel(cfg, ee, state=state, partition=part, stage=spec.stage, chunk=spec.chunk,
                                      initialize=False).eval()
            model.load_state_dict(shard_state_dict(full, cfg, 1, 0, part, spec.stage, spec.chunk, ee), strict=True)
            out = model(input_ids=input_ids if spec.has_embedding else None, hidden_states=hidden)
            hidden = out.output
            exit_logits.update(out.exit_logits)
    return hidden, exit_logits
