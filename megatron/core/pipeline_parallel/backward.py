"""The one place where a stage's exit losses meet the gradient received from the next stage.

For a stage with output ``y``, gradient ``g = dL/dy`` received from downstream and its own weighted exit
loss ``E``, the stage's share of the total gradient is ``dE/dθ + (dy/dθ)ᵀ g``. We get it from a single
autograd call over both roots, ``backward([y, s·E], [g, 1])``, instead of EE-LLM's surrogate
``E + Σ(y ⊙ g)``; the result is the same and the output activation need not be kept for a dot product.

Loss scaling: the last stage multiplies its loss by the scale ``s``, so every received ``g`` already
carries it; exit losses are multiplied by ``s`` here too (EE-LLM forgot, which breaks fp16 dynamic loss
scaling: exit gradients came out ``s`` times too small relative to the final loss's).

Freeing sent outputs (Megatron's pseudo-deallocation, which EE-LLM dropped on exit stages): once a
stage's output has been sent, only its autograd graph is needed -- ``backward([y, s·E], [g, 1])`` never
reads ``y``'s values, and unlike EE-LLM's surrogate ``Σ(y ⊙ g)`` it need not. :func:`free_output` makes
``y`` a one-element, zero-stride tensor of the same shape: memory goes, and the public
``torch.autograd.backward`` still checks ``g``'s shape against ``y``'s (Megatron replaces the data by a
``(1,)`` tensor and must call autograd's private C++ engine to get past that check). Freeing is safe only
if no autograd node saved ``y`` itself -- a post-exit head projecting the stage's last hidden state does:
its linear saves its input -- so a forward whose output will be freed runs under
:func:`saving_aliases`, which makes autograd save detached aliases: a saved ``y`` keeps its storage
(and values) through its alias, and the ``y`` the runtime holds can always be freed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["backward_step", "free_output", "saving_aliases"]


def _alias(t: torch.Tensor) -> torch.Tensor:
    return t.detach()


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


@contextlib.contextmanager
def saving_aliases() -> Iterator[None]:
    """Autograd saves a detached alias (same storage, its own tensor) of every tensor it saves in this
    context, so :func:`free_output` on a tensor made here never changes a saved value. Unpacking
    restores the autograd metadata, so backward is unchanged."""
    with torch.autograd.graph.saved_tensors_hooks(_alias, _same):
        yield


def free_output(output: torch.Tensor) -> None:
    """Drop ``output``'s data but keep its autograd graph and shape (see the module docstring). A view
    is left alone: its storage belongs to its base, so nothing would be freed."""
    if output._base is None:
        output.data = torch.empty((), dtype=output.dtype, device=output.device).expand(output.shape)


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
