"""The cached inference forward of an EarlyExitGPTModel chunk, with optional early exiting.

Decoding strategies (KV recomputation, pipelined early exit, self-speculation) are built on this one
call. The model evaluates each exit on the way and asks ``exit_decider(layer, logits) -> bool [b]``
(per sequence, full-vocab logits ``[b, n, V_padded]`` of the positions asked; with ``exit_hidden`` also
the exit's pre-projection hidden state at the last position ``[b, h]`` as a third argument, which CALM's
hidden-state confidence compares between consecutive exits). Sequences that exit are recorded
(``exited``, ``exit_layer``); the layer loop stops only when *every* sequence has exited, so a batch
where some sequences exit still runs to full depth for the others and its KV cache stays complete.
When the loop stops, deeper layers get no KV for these positions: the strategy re-feeds them later (at
the same offset) to back-fill. Exit logits are never tempered at inference (EE-LLM's behaviour).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .exit_heads import full_vocab_logits, lm_logits

__all__ = ["InferenceOutput", "inference_forward"]

ExitDecider = Callable[..., torch.Tensor]  # (layer, logits) or, with exit_hidden, (layer, logits, hidden)


@dataclass
class InferenceOutput:
    """``hidden``: ``[s, b, h]`` for the next chunk (non-head chunks, when not stopped). ``logits``: final
    full-vocab logits ``[b, n, V_padded]`` (head chunk, when not stopped). ``exit_logits``: each evaluated
    exit's logits, same shape; ``exit_hidden`` (with ``exit_hidden=True``) each evaluated exit's hidden
    state at the last position ``[b, h]``. ``exited`` ``[b]`` bool and ``exit_layer`` ``[b]`` (0: none)
    accumulate over chunks (pass them to the next chunk). ``stopped``: every sequence exited and the remaining layers of
    this chunk were skipped (later chunks need not run)."""

    hidden: Optional[torch.Tensor]
    logits: Optional[torch.Tensor]
    exited: torch.Tensor
    exit_layer: torch.Tensor
    stopped: bool = False
    exit_logits: dict[int, torch.Tensor] = field(default_factory=dict)
    exit_hidden: dict[int, torch.Tensor] = field(default_factory=dict)


def _last(x: torch.Tensor, num_last: int | None) -> torch.Tensor:
    return x if num_last is None else x[-num_last:]


def inference_forward(model, input_ids=None, *, inference_params, position_ids=None, attention_mask=None,
                      hidden_states=None, num_last: int | None = None, evaluate_exits: bool = False,
                      exit_decider: ExitDecider | None = None, exited: torch.Tensor | None = None,
                      exit_layer: torch.Tensor | None = None, exit_hidden: bool = False) -> InferenceOutput:
    """Feed the new tokens (``input_ids`` ``[b, n]`` on the first chunk, else ``hidden_states``) at
    ``inference_params.sequence_len_offset``. ``num_last``: return logits of the last positions only.
    Exits are evaluated when ``evaluate_exits`` or an ``exit_decider`` is given; ``exit_hidden`` also keeps
    their last-position hidden states and passes them to the decider."""
    if model.sequence_parallel:
        raise ValueError("inference runs without --sequence-parallel; build the inference model with it off")
    offset = inference_params.sequence_len_offset
    with torch.no_grad():
        h, _, rope = model.stage_input(input_ids, position_ids, hidden_states, offset=offset)
        b = h.shape[1]
        exited = torch.zeros(b, dtype=torch.bool, device=h.device) if exited is None else exited.clone()
        exit_layer = torch.zeros(b, dtype=torch.long, device=h.device) if exit_layer is None else exit_layer.clone()
        out = InferenceOutput(None, None, exited, exit_layer)
        group = model.state.tp_group

        def on_exit(layer: int, h_exit: torch.Tensor) -> bool:
            if not (evaluate_exits or exit_decider is not None):
                return False
            logits = full_vocab_logits(lm_logits(_last(h_exit, num_last), model.exit_weight(layer), group, False), group)
            out.exit_logits[layer] = logits
            args = (layer, logits)
            if exit_hidden:
                out.exit_hidden[layer] = h_exit[-1]
                args += (h_exit[-1],)
            if exit_decider is None:
                return False
            fire = exit_decider(*args).to(torch.bool) & ~out.exited
            out.exit_layer[fire] = layer
            out.exited |= fire
            return bool(out.exited.all())

        h, out.stopped = model.language_model.encoder.infer(h, attention_mask, rope, inference_params, on_exit)
        if out.stopped:
            return out
        if model.spec.has_head:
            out.logits = full_vocab_logits(lm_logits(_last(h, num_last), model.output_weight(), group, False), group)
        else:
            out.hidden = h
        return out
