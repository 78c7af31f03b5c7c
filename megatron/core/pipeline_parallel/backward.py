"""The one place where a stage's exit losses meet the gradient received from the next stage.

For a stage with output ``y``, gradient ``g = dL/dy`` received from downstream and its own weighted exit
loss ``E``, the stage's share of the total gradient is ``dE/dθ + (dy/dθ)ᵀ g``. We get it from a single
autograd call over both roots, ``backward([y, s·E], [g, 1])``, instead of EE-LLM's surrogate
``E + Σ(y ⊙ g)``; the result is the same and the output activation need not be kept for a dot product.

Loss scaling: the last stage multiplies its loss by the scale ``s``, so every received ``g`` already
carries it; exit losses are multiplied by ``s`` here too (EE-LLM forgot, which breaks fp16 dynamic loss
scaling: exit gradients came out ``s`` times too small relative to the final loss's).
"""

from __future__ import annotations

import torch

__all__ = ["backward_step"]


def backward_step(
    output: torch.Tensor | None,
    output_grad: torch.Tensor | None,
    exit_loss: torch.Tensor | None,
    loss_scale: float | torch.Tensor | None = None,
    input_tensor: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Back-propagate one microbatch through one stage (chunk) and return the gradient of its input.

    Args:
        output: the chunk's output -- the scalar final loss on the chunk holding the head, else the hidden
            state sent downstream; ``None`` when nothing downstream contributes (exit-only backward).
        output_grad: ``dL/d output`` received from the next chunk; ``None`` on the head chunk or when the
            downstream part of this microbatch's backward is truncated.
        exit_loss: the chunk's exit losses, already weighted and normalised, summed to a scalar; ``None``
            when the chunk has no exits.
        loss_scale: multiplies the losses computed here (final and exit); gradients received from
            downstream already carry it.
        input_tensor: the chunk's input hidden state (a leaf with ``requires_grad``), or ``None`` on the
            first chunk.
    """
    roots: list[torch.Tensor] = []
    grads: list[torch.Tensor | None] = []
    scale = 1.0 if loss_scale is None else loss_scale

    local_loss = exit_loss
    if output is not None and output_grad is None:
        if output.dim() != 0:
            raise ValueError(
                "backward_step: a non-scalar stage output needs the gradient received from the next stage"
            )
        local_loss = output if local_loss is None else output + local_loss
    elif output is not None and output.requires_grad:
        roots.append(output)
        grads.append(output_grad)
    if local_loss is not None and local_loss.requires_grad:
        roots.append(local_loss * scale)
        grads.append(None)

    if input_tensor is not None and input_tensor.grad is not None:
        input_tensor.grad = None
    if roots:
        torch.autograd.backward(roots, grads)
    if input_tensor is None:
        return None
    if input_tensor.grad is None:
        # Nothing upstream of this chunk depends on its input for this microbatch (e.g. the exit sits
        # before every use of it); upstream still expects a gradient message, so send zeros.
        return torch.zeros_like(input_tensor)
    return input_tensor.grad
