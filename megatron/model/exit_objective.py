"""The exits' training objective against the model's own final head (EE-Tuning self-distillation).

With ``--exit-distillation-weight w`` the loss of an exit per token is

    (1 - w) * CE(exit logits / t_L, label) + w * D,    D = -sum_j q_j log softmax(exit logits / T)[id_j]

where ``t_L`` is the exit's ``--exit-layer-temperature`` (EE-LLM's tempered token loss, unchanged), ``ids`` are
the final head's top ``K = --exit-distillation-top-k`` token ids (the padding of the vocabulary never among
them) and ``q = softmax(top-K final logits / T)`` is the final head's distribution truncated to them and
renormalised, at ``T = --exit-distillation-temperature``; the teacher has no gradient. ``D`` is a
cross-entropy (it differs from the KL divergence by the teacher's entropy, a constant); it is not multiplied
by ``T^2``. With ``--use-dynamic-exit-layer-weight`` the whole token loss is weighted by the exit's
confidence, as EE-LLM weights its token loss.

Agreement per token: the exit's top-1 (over its whole vocabulary, as decoding sees it) equals the final
head's top-1. The estimator (``--exit-estimator``) is trained with the binary cross-entropy of its logit
against that agreement; its input is detached, so this loss trains the estimator only.

:class:`TeacherTargets` is what the final head hands to the exits (across the pipeline: see
``megatron/core/pipeline_parallel/schedules/generators.py``'s ``ee_tuning_with_teacher``); all values here are
per token ``[b, s]``, masked and averaged by the training step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron.core.tensor_parallel.soft_targets import vocab_parallel_soft_cross_entropy, vocab_parallel_top_k

from .exit_heads import exit_confidence, token_losses

__all__ = ["TeacherTargets", "teacher_targets", "ExitTerms", "exit_terms", "target_message_specs"]


@dataclass(frozen=True)
class TeacherTargets:
    """The final head's top-K per token: ``ids`` int64 ``[b, s, K]`` (descending logits) and ``log_probs``
    fp32 ``[b, s, K]`` (log of the truncated, renormalised distribution at the distillation temperature)."""

    ids: torch.Tensor
    log_probs: torch.Tensor

    @property
    def top1(self) -> torch.Tensor:
        """The final head's top-1 token ``[b, s]``."""
        return self.ids[..., 0]

    def as_message(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ids, self.log_probs

    @classmethod
    def from_message(cls, message) -> "TeacherTargets":
        ids, log_probs = message
        return cls(ids, log_probs)


def target_message_specs(micro_batch_size: int, seq_length: int, top_k: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of :meth:`TeacherTargets.as_message` (what a pipeline stage receives)."""
    shape = (micro_batch_size, seq_length, top_k)
    return [(shape, torch.int64), (shape, torch.float32)]


@torch.no_grad()
def teacher_targets(final_logits: torch.Tensor, top_k: int, temperature: float, tp_group,
                    vocab_size: int | None) -> TeacherTargets:
    """From the final head's vocab-parallel logits ``[s, b, V/tp]`` (``vocab_size``: the unpadded size)."""
    values, ids = vocab_parallel_top_k(final_logits, top_k, tp_group, vocab_size)
    log_probs = torch.log_softmax(values / temperature, dim=-1)
    return TeacherTargets(ids.transpose(0, 1).contiguous(), log_probs.transpose(0, 1).contiguous())


@dataclass
class ExitTerms:
    """One exit's per-token ``[b, s]`` training terms: ``loss`` (the objective above), ``agree`` (1.0 where
    the exit's top-1 is the final head's) and ``estimator`` (the estimator's BCE, when it has one)."""

    loss: torch.Tensor
    agree: torch.Tensor
    estimator: torch.Tensor | None = None


def exit_terms(logits: torch.Tensor, labels: torch.Tensor, targets: TeacherTargets, tp_group, *, weight: float,
               temperature: float, exit_temperature: float = 1.0, dynamic: bool = False,
               estimator_logits: torch.Tensor | None = None) -> ExitTerms:
    """Terms of one exit from its untempered vocab-parallel logits ``[s, b, V/tp]``, the labels ``[b, s]``,
    the teacher's targets and (optionally) its estimator's logits ``[b, s]``."""
    loss = None
    # the tempered logits are a full [s, b, V/tp] copy: made only when the token loss or the dynamic weight reads them
    tempered = logits / exit_temperature if weight < 1.0 or dynamic else None
    if weight < 1.0:
        loss = (1.0 - weight) * token_losses(tempered, labels, tp_group)
    if weight > 0.0:
        ids = targets.ids.transpose(0, 1)
        q = targets.log_probs.transpose(0, 1).exp()
        d = vocab_parallel_soft_cross_entropy(logits, ids, q, tp_group, temperature).t()
        loss = weight * d if loss is None else loss + weight * d
    if dynamic:
        loss = loss * exit_confidence(tempered, tp_group).t()
    with torch.no_grad():
        exit_top1 = vocab_parallel_top_k(logits, 1, tp_group)[1][..., 0].t()
        agree = (exit_top1 == targets.top1).float()
    estimator = None
    if estimator_logits is not None:
        estimator = F.binary_cross_entropy_with_logits(estimator_logits.float(), agree, reduction="none")
    return ExitTerms(loss, agree, estimator)
