"""The self-distillation objective against plain-torch references (full softmax, top-k renormalised), the
estimator's loss and the agreement, and the teacher's top-k (padding never chosen)."""

import pytest
import torch
import torch.nn.functional as F

from megatron.core.tensor_parallel.soft_targets import vocab_parallel_soft_cross_entropy, vocab_parallel_top_k
from megatron.model.exit_objective import exit_terms, teacher_targets


def _logits(s=5, b=3, v=40, seed=0, scale=3.0):
    return torch.randn(s, b, v, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float() * scale


def _reference_teacher(final, k, t, vocab):
    """The final head's distribution at temperature t over the real vocab, truncated to its top k and
    renormalised -- computed from the full softmax."""
    p = torch.softmax(final[..., :vocab].double() / t, dim=-1)
    top_p, ids = p.topk(k, dim=-1)
    return ids, top_p / top_p.sum(-1, keepdim=True)


def test_top_k_skips_the_padding_and_matches_torch():
    x = _logits()
    x[..., 37:] = 100.0  # padded columns would win if they counted
    values, ids = vocab_parallel_top_k(x, 6, None, vocab_size=37)
    ref_values, ref_ids = x[..., :37].topk(6, dim=-1)
    assert torch.equal(ids, ref_ids) and torch.equal(values, ref_values)
    with pytest.raises(ValueError, match="k <= the vocabulary"):
        vocab_parallel_top_k(x, 38, None, vocab_size=37)


@pytest.mark.parametrize("t", [1.0, 2.5])
def test_teacher_targets_are_the_truncated_renormalised_distribution(t):
    final = _logits(seed=1)
    targets = teacher_targets(final, 7, t, None, 37)
    ids, q = _reference_teacher(final, 7, t, 37)
    assert torch.equal(targets.ids, ids.transpose(0, 1))
    torch.testing.assert_close(targets.log_probs.exp().double(), q.transpose(0, 1), rtol=1e-6, atol=1e-7)
    assert torch.equal(targets.top1, ids[..., 0].t())


@pytest.mark.parametrize("t", [1.0, 0.7])
def test_soft_cross_entropy_value_and_gradient(t):
    z = _logits(seed=2).requires_grad_()
    ids = torch.randint(0, 40, (5, 3, 4), generator=torch.Generator().manual_seed(3))
    q = torch.softmax(torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(4)), -1)
    loss = vocab_parallel_soft_cross_entropy(z, ids, q, None, t)
    z_ref = z.detach().double().requires_grad_()
    ref = -(q.double() * torch.log_softmax(z_ref / t, -1).gather(-1, ids)).sum(-1)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    g = torch.randn(5, 3, generator=torch.Generator().manual_seed(5))
    loss.backward(g)
    ref.backward(g.double())
    torch.testing.assert_close(z.grad.double(), z_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("w", [0.0, 0.3, 1.0])
def test_exit_terms_against_a_full_softmax_reference(w):
    s, b, v, vocab, k, t, t_exit = 6, 2, 40, 37, 5, 2.0, 1.5
    final = _logits(s, b, v, seed=6)
    z = (final + _logits(s, b, v, seed=7, scale=2.0)).requires_grad_()  # a student that partly agrees
    labels = torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(8))
    est = torch.randn(b, s, generator=torch.Generator().manual_seed(9), requires_grad=True)
    targets = teacher_targets(final, k, t, None, vocab)
    terms = exit_terms(z, labels, targets, None, weight=w, temperature=t, exit_temperature=t_exit,
                       estimator_logits=est)

    ids, q = _reference_teacher(final, k, t, vocab)
    zd = z.detach().double()
    ce = F.cross_entropy((zd / t_exit).reshape(-1, v), labels.t().reshape(-1), reduction="none").view(s, b)
    d = -(q * torch.log_softmax(zd / t, -1).gather(-1, ids)).sum(-1)
    ref_loss = ((1 - w) * ce + w * d).t()
    torch.testing.assert_close(terms.loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    agree = (zd.argmax(-1) == final[..., :vocab].argmax(-1)).t().double()
    assert torch.equal(terms.agree.double(), agree)
    assert 0 < agree.sum() < agree.numel()  # not a vacuous comparison
    ref_bce = -(agree * F.logsigmoid(est.double()) + (1 - agree) * F.logsigmoid(-est.double()))
    torch.testing.assert_close(terms.estimator.double(), ref_bce, rtol=1e-6, atol=1e-6)
    # The teacher carries no gradient; the estimator's loss reaches only the estimator logits.
    terms.estimator.sum().backward()
    assert z.grad is None and est.grad is not None


def test_agreement_is_not_vacuous():
    final = _logits(seed=10)
    same = teacher_targets(final, 3, 1.0, None, 40)
    terms = exit_terms(final.clone(), torch.zeros(3, 5, dtype=torch.long), same, None, weight=1.0, temperature=1.0)
    assert bool(terms.agree.all())
    other = exit_terms(-final, torch.zeros(3, 5, dtype=torch.long), same, None, weight=1.0, temperature=1.0)
    assert not bool(other.agree.any())
